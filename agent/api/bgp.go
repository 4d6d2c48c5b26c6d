package api

import (
	"net/http"

	"github.com/labstack/echo/v4"
)

func (s *Server) getBGP(c echo.Context) error {
	return c.JSON(http.StatusOK, s.opts.Controller.BGP())
}

func (s *Server) setNodeDrain(c echo.Context, drained bool) error {
	if err := s.opts.Controller.SetNodeDrained(c.Request().Context(), drained); err != nil {
		return err
	}
	return c.JSON(http.StatusOK, s.opts.Controller.BGP())
}

func (s *Server) drainNode(c echo.Context) error   { return s.setNodeDrain(c, true) }
func (s *Server) undrainNode(c echo.Context) error { return s.setNodeDrain(c, false) }
