// Command etcd is the etcd server for the Istio lab: etcd's own entry point,
// built against the go.etcd.io/etcd/server/v3 version the API server requires.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
