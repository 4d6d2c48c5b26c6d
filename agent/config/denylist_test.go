package config

import (
	"slices"
	"strings"
	"testing"
)

// An IPv4-mapped denylist entry denies the IPv4 client it names: it is
// stored as the IPv4 prefix, because IPv4 packets are matched against the
// IPv4 table only.
func TestDenylistUnmapsIPv4MappedEntries(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"::ffff:10.77.0.2", "10.77.0.2/32"},
		{"::ffff:10.77.0.2/128", "10.77.0.2/32"},
		{"::FFFF:10.77.1.9/120", "10.77.1.0/24"},
		{"::ffff:0.0.0.0/96", "0.0.0.0/0"},
		{"10.77.0.2", "10.77.0.2/32"},
		{"2001:db8::1/32", "2001:db8::/32"},
		{"::10.77.0.2", "::a4d:2/128"}, // IPv4-compatible, not mapped: a plain IPv6 address
	} {
		p, err := ParseDenyPrefix(tc.in)
		if err != nil || p.String() != tc.want {
			t.Errorf("ParseDenyPrefix(%q) = %v, %v; want %s", tc.in, p, err, tc.want)
		}
	}

	c, err := Parse([]byte(minimal + "security:\n  denylist: [\"::ffff:10.77.0.2\", 10.77.0.2, \"::ffff:10.78.0.0/112\"]\n"))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if got, want := c.Security.Denylist, []string{"10.77.0.2/32", "10.78.0.0/16"}; !slices.Equal(got, want) {
		t.Errorf("denylist = %q, want %q", got, want)
	}
}

// A mapped prefix shorter than /96 covers IPv6 addresses as well, so it
// cannot become an IPv4 prefix: it is refused with the way to write it.
func TestDenylistRefusesShortMappedPrefixes(t *testing.T) {
	_, err := Parse([]byte(minimal + "security:\n  denylist: [10.0.0.0/8, \"::ffff:10.77.0.2/80\"]\n"))
	if err == nil {
		t.Fatal("Parse accepted ::ffff:10.77.0.2/80")
	}
	msg := err.Error()
	for _, want := range []string{"security.denylist[1]", "shorter than /96", "10.77.0.2/32"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not say %q", msg, want)
		}
	}
}
