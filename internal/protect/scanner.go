package protect

import "strings"

// Paths that vulnerability scanners probe. None is a route of this
// server, so answering them 404 at once only saves work and log noise.
var (
	scannerPrefixes = []string{
		"/wp-admin", "/wp-login", "/wp-content", "/wp-includes", "/wp-json", "/wordpress", "/xmlrpc",
		"/.env", "/.git", "/.svn", "/.hg", "/.aws", "/.ssh", "/.docker", "/.vscode", "/.idea", "/.ds_store", "/.htaccess", "/.htpasswd",
		"/cgi-bin", "/phpmyadmin", "/pma", "/myadmin", "/mysql", "/phpunit", "/vendor/",
		"/actuator", "/solr", "/boaform", "/hnap1", "/owa/", "/autodiscover", "/ecp/", "/remote/login",
		"/server-status", "/console/", "/manager/html", "/jenkins", "/telescope", "/_ignition", "/debug/",
		"/config.json", "/backup", "/admin", "/administrator", "/setup", "/install",
	}
	scannerSuffixes = []string{
		".php", ".php5", ".phtml", ".asp", ".aspx", ".ashx", ".jsp", ".jspa", ".do", ".action", ".cgi", ".pl",
		".env", ".ini", ".bak", ".old", ".orig", ".swp", ".sql", ".sqlite", ".db", ".tar", ".tar.gz", ".tgz", ".zip", ".rar", ".7z",
		".yml", ".yaml", ".conf", ".config", ".xml", ".log", ".pem", ".key",
	}
	scannerContains = []string{"/.git/", "/.env", "/../", "%2e%2e", "/etc/passwd", "/wp-"}
)

// IsScannerPath reports whether an HTTP path is one that vulnerability
// scanners probe.
func IsScannerPath(path string) bool {
	p := strings.ToLower(path)
	for _, s := range scannerPrefixes {
		if strings.HasPrefix(p, s) {
			return true
		}
	}
	for _, s := range scannerSuffixes {
		if strings.HasSuffix(p, s) {
			return true
		}
	}
	for _, s := range scannerContains {
		if strings.Contains(p, s) {
			return true
		}
	}
	return false
}
