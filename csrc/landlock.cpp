// Landlock: the file-system (and, on newer kernels, TCP and signal) policy of a run child.
// Chosen over a mount namespace because it needs no privileges, costs a handful of syscalls per
// run (a mount namespace costs a clone of the mount table) and is inherited by every thread.
// Structs and constants are spelled out here so the build does not depend on kernel headers.
#include "landlock.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif

namespace rci {
namespace {

struct RulesetAttr {
  uint64_t handled_access_fs;
  uint64_t handled_access_net;  // ABI >= 4
  uint64_t scoped;              // ABI >= 6
};

struct __attribute__((packed)) PathBeneathAttr {
  uint64_t allowed_access;
  int32_t parent_fd;
};

constexpr uint32_t kCreateRulesetVersion = 1;
constexpr int kRulePathBeneath = 1;

constexpr uint64_t FS_EXECUTE = 1ull << 0, FS_WRITE_FILE = 1ull << 1, FS_READ_FILE = 1ull << 2,
                   FS_READ_DIR = 1ull << 3, FS_REFER = 1ull << 13, FS_TRUNCATE = 1ull << 14,
                   FS_IOCTL_DEV = 1ull << 15;
constexpr uint64_t FS_ABI1_ALL = (1ull << 13) - 1;  // execute .. make_sym
constexpr uint64_t NET_BIND_TCP = 1, NET_CONNECT_TCP = 2;
constexpr uint64_t SCOPE_ABSTRACT_UNIX = 1, SCOPE_SIGNAL = 2;

uint64_t handled_fs(int abi) {
  uint64_t fs = FS_ABI1_ALL;
  if (abi >= 2) fs |= FS_REFER;
  if (abi >= 3) fs |= FS_TRUNCATE;
  if (abi >= 5) fs |= FS_IOCTL_DEV;
  return fs;
}

int add_rule(int ruleset, int fd, uint64_t access) {
  PathBeneathAttr attr{access, fd};
  if (syscall(SYS_landlock_add_rule, ruleset, kRulePathBeneath, &attr, 0) != 0) return -errno;
  return 0;
}

}  // namespace

int landlock_abi() {
  long v = syscall(SYS_landlock_create_ruleset, nullptr, 0, kCreateRulesetVersion);
  return v > 0 ? static_cast<int>(v) : 0;
}

LandlockPaths open_landlock_paths(const std::vector<std::string>& read_paths,
                                  const std::vector<std::string>& rw_files) {
  LandlockPaths out;
  for (const auto& p : read_paths) {
    int fd = open(p.c_str(), O_PATH | O_CLOEXEC);
    if (fd < 0) continue;  // a missing optional path is simply not granted
    struct stat st;
    if (fstat(fd, &st) != 0) { close(fd); continue; }
    out.read_fds.push_back(fd);
    out.read_is_dir.push_back(S_ISDIR(st.st_mode));
  }
  for (const auto& p : rw_files) {
    int fd = open(p.c_str(), O_PATH | O_CLOEXEC);
    if (fd >= 0) out.rw_file_fds.push_back(fd);
  }
  return out;
}

int landlock_build_ruleset(int abi, const LandlockPaths& paths, int scratch_fd) {
  RulesetAttr attr{handled_fs(abi), 0, 0};
  size_t size = sizeof(uint64_t);
  if (abi >= 4) { attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP; size = 2 * sizeof(uint64_t); }
  if (abi >= 6) { attr.scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL; size = sizeof(attr); }
  int rs = static_cast<int>(syscall(SYS_landlock_create_ruleset, &attr, size, 0));
  if (rs < 0) return -errno;

  const uint64_t file_bits = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV;
  const uint64_t fs = attr.handled_access_fs;
  int err = 0;
  for (size_t i = 0; i < paths.read_fds.size() && !err; ++i) {
    uint64_t access = FS_EXECUTE | FS_READ_FILE | (paths.read_is_dir[i] ? FS_READ_DIR : 0);
    err = add_rule(rs, paths.read_fds[i], access & fs);
  }
  for (int fd : paths.rw_file_fds)
    if (!err) err = add_rule(rs, fd, (FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE) & fs & file_bits);
  if (!err) err = add_rule(rs, scratch_fd, fs);
  if (err) { close(rs); return err; }
  return rs;
}

int landlock_restrict(int ruleset_fd) {
  if (syscall(SYS_landlock_restrict_self, ruleset_fd, 0) != 0) return -errno;
  return 0;
}

}  // namespace rci
