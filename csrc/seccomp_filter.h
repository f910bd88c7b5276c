#pragma once
#include <sys/types.h>

namespace rci {

// Installs the run child's seccomp-bpf filter (requires no_new_privs). `self_pid` is the child's
// own pid: signals may only target it. Returns 0 or -errno.
int install_seccomp_filter(pid_t self_pid);

// Number of BPF instructions of the filter (for tests and docs).
int seccomp_filter_length();

}  // namespace rci
