package registry

import "errors"

// ErrSchemaOutdated means the database schema lacks migrations that this
// build needs; `machineservice migrate` applies them.
var ErrSchemaOutdated = errors.New("database schema is not up to date")
