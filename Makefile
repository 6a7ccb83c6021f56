# noid build. `make` builds the three binaries into bin/.
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/noid-vm/noid/internal/server.Version=$(VERSION) -X github.com/noid-vm/noid/internal/cli.Version=$(VERSION)

.PHONY: all build test clean
all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/noid ./cmd/noid
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/noid-server ./cmd/noid-server
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/noid-agent ./cmd/noid-agent

test:
	./scripts/test.sh

clean:
	rm -rf bin
