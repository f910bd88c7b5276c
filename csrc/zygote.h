#pragma once
#include <sys/types.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "landlock.h"
#include "protocol.h"

namespace rci {

struct ZygoteConfig {
  std::string scratch_root;              // one sub-folder per run child, removed after it
  std::vector<std::string> read_paths;   // what a run may read (Landlock)
  std::vector<std::string> rw_files;     // files a run may also write, e.g. /dev/null
  int run_uid = -1;                      // >= 0: runs drop to this uid/gid (only when root)
  int run_gid = -1;
  bool uid_per_worker = false;           // runs drop to their worker's own uid instead (see below)
  uint32_t max_sessions = 256;           // live session children per worker
  void (*after_fork_child)() = nullptr;  // re-initialises the interpreter after a fork
};

// Per-worker run uids: RLIMIT_NPROC counts every process of a uid on the machine, so runs that
// shared one (nobody) shared one thread budget with each other, with other sandboxes' runs and
// with the uid's other processes. A worker's uid is kWorkerUidBase + (pid + pid namespace inode
// * kUidMix) mod kWorkerUidSpan: distinct for the workers of one pid namespace, apart (but for
// chance) across containers, whose pids repeat. The range lies above systemd's container ranges
// (up to 0x6FFFFFFF) and SSSD's default id-mapping range (up to 2000200000), below systemd's
// "foreign" range (0x7FFE0000) and 2^31. sandbox/pool.py: worker_uid() is the same formula.
constexpr uint32_t kWorkerUidBase = 0x78000000;
constexpr uint32_t kWorkerUidSpan = 0x7FFE0000 - kWorkerUidBase;
constexpr uint64_t kUidMix = 0x9E3779B1;

// Serves the host on `control_fd`: on each 'W' byte forks a worker and sends back one end of a
// socketpair plus the worker pid (SCM_RIGHTS). Never returns in the template or in workers (they
// _exit when the host closes its end); returns inside a new spare child, which then prepares
// itself in Python and calls child_start() to wait for code.
void serve_template(int control_fd, const ZygoteConfig& config);

// Mounts a size- and inode-capped tmpfs over `path` in a new private mount namespace of the calling
// process (the template), so runs' scratch files never reach the disk and cannot exhaust it.
// Returns false (nothing changed or only the namespace) when not permitted.
bool mount_private_tmpfs(const std::string& path, uint64_t size_bytes, uint64_t max_inodes);

// In a spare child: lock the process down (capabilities, uid, no_new_privs, Landlock, seccomp;
// the worker sets the run's rlimits), then wait for the first code. False: the worker is gone.
bool child_start(std::string* code, bool* session);

// In a run child: report how the last piece of code ended, then (session mode) wait for the next.
void child_report(int exit_code, bool memory_error);
bool child_next(std::string* code);  // false: the worker closed the session

// Errors the setup reports to Python before any fork.
struct SandboxSetupError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace rci
