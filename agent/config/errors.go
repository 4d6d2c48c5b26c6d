package config

import "strings"

// FieldError is one problem in a configuration, located by the path of the
// offending value, e.g. "pools[1].backends[0].port". Path is empty for
// problems with the document as a whole (syntax errors, empty input).
type FieldError struct {
	Path    string `json:"path"`
	Message string `json:"message"`
}

// Error returns "path: message", or just the message when Path is empty.
func (e FieldError) Error() string {
	if e.Path == "" {
		return e.Message
	}
	return e.Path + ": " + e.Message
}

// ValidationError carries every problem found in a configuration, so that
// all of them can be fixed in one go rather than one per attempt.
type ValidationError struct {
	Errors []FieldError `json:"errors"`
}

// Error returns the individual errors, one per line.
func (e *ValidationError) Error() string {
	if len(e.Errors) == 0 {
		return "invalid configuration"
	}
	lines := make([]string, len(e.Errors))
	for i, fe := range e.Errors {
		lines[i] = fe.Error()
	}
	return strings.Join(lines, "\n")
}
