//go:build tools

// Package promtoolbuild pins the promtool that scripts/validate-deploy.sh builds to check
// deploy/prometheus/alerts.yaml, so that `go mod tidy` keeps its dependencies in go.sum.
//
// Why a wrapper module: `go install github.com/prometheus/prometheus/cmd/promtool@VERSION`
// is refused because Prometheus' go.mod has a replace directive, and v0.316.0 depends on a
// github.com/hashicorp/nomad/api pseudo-version the module proxy does not serve (403).
package promtoolbuild

import (
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
