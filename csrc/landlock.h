#pragma once
#include <string>
#include <vector>

namespace rci {

// Landlock ABI version of the running kernel, or 0 when Landlock is unavailable.
int landlock_abi();

// Paths a run may read (directories or files) and files it may also write (e.g. /dev/null),
// opened once as O_PATH descriptors that forked processes inherit.
struct LandlockPaths {
  std::vector<int> read_fds;
  std::vector<bool> read_is_dir;
  std::vector<int> rw_file_fds;
};
LandlockPaths open_landlock_paths(const std::vector<std::string>& read_paths,
                                  const std::vector<std::string>& rw_files);

// Builds a ruleset: reads below `paths`, everything below the directory `scratch_fd`, no TCP,
// and (ABI >= 6) no signals or abstract unix sockets outside the process. Returns fd or -errno.
int landlock_build_ruleset(int abi, const LandlockPaths& paths, int scratch_fd);

// Applies the ruleset to the calling process. Returns 0 or -errno.
int landlock_restrict(int ruleset_fd);

}  // namespace rci
