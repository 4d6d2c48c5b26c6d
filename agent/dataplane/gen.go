package dataplane

// The BPF objects are compiled once by `make generate` and committed, so a
// plain `go build` needs no clang. -mcpu=v3 needs Linux 5.1, well below the
// 5.16 that the rest of the data path requires.
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang-19 -strip llvm-strip-19 -target bpfel -cflags "-O2 -g -Wall -Werror -mcpu=v3" -type vf_vip_key -type vf_vip_meta -type vf_vip_slot -type vf_real -type vf_flow_key -type vf_flow4_key -type vf_ct_entry -type vf_ct4_slot -type vf_ct4_set -type vf_vip_stats -type vf_real_stats -type vf_counter -type vf_settings_t -type vf_lpm4_key -type vf_lpm6_key -type vf_event -type vf_iface -type vf_nat_vip -type vf_nat_addr_key -type vf_nat_real_key -type vf_nat_entry -type vf_flow_limit_key -type vf_flow_limit_bucket -type vf_reason -type vf_mode -type vf_real_state -type vf_size -type vf_family balancer ../../bpf/balancer.bpf.c -- -I../../bpf/include -I../../vmlinux
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang-19 -strip llvm-strip-19 -target bpfel -cflags "-O2 -g -Wall -Werror -mcpu=v3" -type vf_local_key -type vf_decap_config_t -type vf_decap_counters -type vf_decap_default decap ../../bpf/decap.bpf.c -- -I../../bpf/include -I../../vmlinux
