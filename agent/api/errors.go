package api

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"

	"github.com/labstack/echo/v4"

	"github.com/veloflux/veloflux/agent/config"
)

// Error is the body of every error response:
// {"error":{"code","message","field"}}, plus every problem when a
// configuration change failed validation.
type Error struct {
	Status  int                 `json:"-"`
	Code    string              `json:"code"`
	Message string              `json:"message"`
	Field   string              `json:"field,omitempty"`
	Details []config.FieldError `json:"details,omitempty"`
}

func (e *Error) Error() string { return e.Message }

type errorBody struct {
	Error *Error `json:"error"`
}

func newError(status int, code, format string, args ...any) *Error {
	return &Error{Status: status, Code: code, Message: fmt.Sprintf(format, args...)}
}

func notFound(format string, args ...any) *Error {
	return newError(http.StatusNotFound, "not_found", format, args...)
}

func conflict(format string, args ...any) *Error {
	return newError(http.StatusConflict, "conflict", format, args...)
}

func badRequest(format string, args ...any) *Error {
	return newError(http.StatusBadRequest, "bad_request", format, args...)
}

// asAPIError maps any error to the response it deserves.
func asAPIError(err error) *Error {
	var apiErr *Error
	if errors.As(err, &apiErr) {
		return apiErr
	}
	var verr *config.ValidationError
	if errors.As(err, &verr) && len(verr.Errors) > 0 {
		first := verr.Errors[0]
		msg := first.Error()
		if n := len(verr.Errors); n > 1 {
			msg = fmt.Sprintf("%s (and %d more problems)", msg, n-1)
		}
		return &Error{Status: http.StatusUnprocessableEntity, Code: "invalid_config", Message: msg,
			Field: first.Path, Details: verr.Errors}
	}
	var he *echo.HTTPError
	if errors.As(err, &he) {
		code := "http_error"
		switch he.Code {
		case http.StatusNotFound:
			code = "not_found"
		case http.StatusMethodNotAllowed:
			code = "method_not_allowed"
		case http.StatusRequestEntityTooLarge:
			code = "too_large"
		}
		return &Error{Status: he.Code, Code: code, Message: fmt.Sprint(he.Message)}
	}
	return &Error{Status: http.StatusInternalServerError, Code: "internal", Message: err.Error()}
}

func errorHandler(log *slog.Logger) echo.HTTPErrorHandler {
	return func(err error, c echo.Context) {
		if c.Response().Committed {
			return
		}
		e := asAPIError(err)
		if e.Status >= 500 {
			log.Error("API request failed", "method", c.Request().Method, "path", c.Path(), "err", err)
		}
		if c.Request().Method == http.MethodHead {
			c.NoContent(e.Status)
			return
		}
		c.JSON(e.Status, errorBody{Error: e})
	}
}
