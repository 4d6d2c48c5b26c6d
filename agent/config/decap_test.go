package config

import (
	"errors"
	"slices"
	"testing"
)

// A backend's file may hold only a decap section; defaults fill the rest,
// and addresses come out canonical.
func TestDecapSectionAlone(t *testing.T) {
	c, err := Parse([]byte("decap:\n  interfaces: [eth0, eth1]\n  local: [10.0.0.11, \"2001:db8:0::11\"]\n"))
	if err != nil {
		t.Fatal(err)
	}
	d := c.Decap
	if d == nil || !slices.Equal(d.Interfaces, []string{"eth0", "eth1"}) || !slices.Equal(d.Local, []string{"10.0.0.11", "2001:db8::11"}) ||
		d.GUEPort != DefaultGUEPort || d.XDPMode != XDPModeAuto {
		t.Fatalf("decap section %+v", d)
	}
	if len(c.VIPs) != 0 || len(c.Dataplane.Interfaces) != 0 {
		t.Fatalf("a backend's file configured a balancer: %+v", c)
	}
	c, err = Parse([]byte("decap:\n  interfaces: [eth0]\n  local: [10.0.0.11]\n  gue_port: 0\n  xdp_mode: generic\n"))
	if err != nil || c.Decap.GUEPort != 0 || c.Decap.XDPMode != XDPModeGeneric {
		t.Fatalf("explicit gue_port 0 and xdp_mode: %+v, %v", c.Decap, err)
	}
}

// Every problem of the section is reported at once, each at its path.
func TestDecapSectionErrors(t *testing.T) {
	_, err := Parse([]byte(`decap:
  interfaces: ["", eth0, eth0, "averyveryverylongname"]
  local: [10.0.0.11, 10.0.0.11, "::", "224.0.0.1", "fe80::1%eth0", "::ffff:10.0.0.1", 127.0.0.1]
  gue_port: -1
  xdp_mode: turbo
`))
	var verr *ValidationError
	if !errors.As(err, &verr) {
		t.Fatalf("error %v, want a ValidationError", err)
	}
	want := []string{
		"decap.interfaces[0]", "decap.interfaces[2]", "decap.interfaces[3]",
		"decap.local[1]", "decap.local[2]", "decap.local[3]", "decap.local[4]", "decap.local[5]", "decap.local[6]",
		"decap.gue_port", "decap.xdp_mode",
	}
	var got []string
	for _, fe := range verr.Errors {
		got = append(got, fe.Path)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("problems at\n %v\nwant\n %v\n%v", got, want, err)
	}
	_, err = Parse([]byte("decap: {}\n"))
	if !errors.As(err, &verr) || len(verr.Errors) != 2 || verr.Errors[0].Path != "decap.interfaces" || verr.Errors[1].Path != "decap.local" {
		t.Fatalf("an empty section: %v", err)
	}
}
