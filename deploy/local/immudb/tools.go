//go:build tools

// Package immudbbuild pins the immudb commands that deploy/local/stack.sh
// builds, so that `go mod tidy` keeps their dependencies in go.sum.
package immudbbuild

import (
	_ "github.com/codenotary/immudb/cmd/immuadmin"
	_ "github.com/codenotary/immudb/cmd/immuclient"
	_ "github.com/codenotary/immudb/cmd/immudb"
)
