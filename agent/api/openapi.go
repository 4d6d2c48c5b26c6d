package api

import (
	"net/http"
	"regexp"
	"strings"

	"github.com/labstack/echo/v4"
)

var pathParam = regexp.MustCompile(`:([a-z_]+)`)

// openAPIPath turns echo's /api/pools/:name into /api/pools/{name}.
func openAPIPath(p string) string {
	return pathParam.ReplaceAllString(p, "{$1}")
}

// OpenAPI builds the OpenAPI 3 document from the route table, so the
// document lists exactly what is registered.
func (s *Server) OpenAPI() map[string]any {
	paths := map[string]any{}
	for _, r := range s.routes {
		p := openAPIPath(r.path)
		item, _ := paths[p].(map[string]any)
		if item == nil {
			item = map[string]any{}
			paths[p] = item
		}
		op := map[string]any{
			"summary":     r.summary,
			"operationId": strings.ToLower(r.method) + strings.NewReplacer("/", "_", ":", "", "{", "", "}", "", ".", "_").Replace(r.path),
			"responses": map[string]any{
				"200":     map[string]any{"description": "OK", "content": map[string]any{"application/json": map[string]any{}}},
				"default": map[string]any{"description": "Error", "content": jsonSchema("#/components/schemas/Error")},
			},
		}
		var params []any
		for _, m := range pathParam.FindAllStringSubmatch(r.path, -1) {
			params = append(params, map[string]any{"name": m[1], "in": "path", "required": true, "schema": map[string]any{"type": "string"}})
		}
		if len(params) > 0 {
			op["parameters"] = params
		}
		if r.body != "" {
			op["requestBody"] = map[string]any{"required": true, "content": jsonSchema("#/components/schemas/" + r.body)}
		}
		if r.write || s.access.Load().ProtectReads {
			op["security"] = []any{map[string]any{"bearer": []any{}}}
		}
		item[strings.ToLower(r.method)] = op
	}
	object := func(props ...string) map[string]any {
		m := map[string]any{}
		for _, p := range props {
			m[p] = map[string]any{}
		}
		return map[string]any{"type": "object", "properties": m}
	}
	return map[string]any{
		"openapi": "3.0.3",
		"info": map[string]any{"title": "VeloFlux API", "version": s.opts.Version,
			"description": "REST API of the VeloFlux agent. Writes need Authorization: Bearer <token>. " +
				"Errors are {\"error\":{\"code\",\"message\",\"field\"}}."},
		"paths": paths,
		"components": map[string]any{
			"securitySchemes": map[string]any{"bearer": map[string]any{"type": "http", "scheme": "bearer"}},
			"schemas": map[string]any{
				"Error":      map[string]any{"type": "object", "properties": map[string]any{"error": object("code", "message", "field", "details")}},
				"Config":     object("node", "dataplane", "api", "metrics", "proxy", "pools", "vips", "routes", "security"),
				"Pool":       object("name", "algorithm", "backends", "health_check"),
				"Backend":    object("address", "port", "weight"),
				"VIP":        object("address", "port", "protocol", "mode", "pool", "source_affinity", "snat_address"),
				"Route":      object("host", "path_prefix", "pool"),
				"DenyPrefix": object("prefix"),
			},
		},
	}
}

func jsonSchema(ref string) map[string]any {
	return map[string]any{"application/json": map[string]any{"schema": map[string]any{"$ref": ref}}}
}

func (s *Server) openAPI(c echo.Context) error {
	return c.JSON(http.StatusOK, s.OpenAPI())
}
