package protect

import (
	"net/http"
	"strings"
)

// origins is the CORS__ALLOWEDORIGINS list. An empty list allows every
// origin and sends no CORS headers, as the server did before the setting.
type origins struct {
	any    bool // "*" was listed
	listed map[string]bool
}

func newOrigins(list []string) *origins {
	if len(list) == 0 {
		return nil
	}
	o := &origins{listed: map[string]bool{}}
	for _, s := range list {
		if s == "*" {
			o.any = true
			continue
		}
		o.listed[normalizeOrigin(s)] = true
	}
	return o
}

// normalizeOrigin lower-cases an origin and drops a trailing slash:
// browsers send scheme://host[:port] in lower case.
func normalizeOrigin(s string) string {
	return strings.TrimSuffix(strings.ToLower(strings.TrimSpace(s)), "/")
}

func (o *origins) allowed(origin string) bool {
	return o == nil || o.any || o.listed[normalizeOrigin(origin)]
}

// corsMaxAge is how long browsers may cache a preflight answer, in
// seconds.
const corsMaxAge = "600"

// setHeaders adds the CORS headers for an allowed origin.
func (o *origins) setHeaders(h http.Header, origin string) {
	if o.any && !o.listed[normalizeOrigin(origin)] {
		h.Set("Access-Control-Allow-Origin", "*")
	} else {
		h.Set("Access-Control-Allow-Origin", origin)
	}
	h.Add("Vary", "Origin")
}

// setPreflight adds the headers of a preflight answer.
func setPreflight(h http.Header, r *http.Request) {
	h.Set("Access-Control-Allow-Methods", "GET, OPTIONS")
	if req := r.Header.Get("Access-Control-Request-Headers"); req != "" {
		h.Set("Access-Control-Allow-Headers", req)
	}
	h.Set("Access-Control-Max-Age", corsMaxAge)
}

func isPreflight(r *http.Request) bool {
	return r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != ""
}
