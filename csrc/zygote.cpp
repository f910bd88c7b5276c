// The fork server: template -> workers -> run children.
//
// The template is a Python process that has imported the warm modules; it forks one worker per
// host request. A worker serves one host connection and keeps one pre-forked "spare" run child
// waiting, so a request only has to hand over the code: the fork, the page-table copy and the
// reaping of the previous child all happen while the host is busy with something else. A run
// child locks itself down (rlimits, own uid, no_new_privs, Landlock, seccomp) right after it
// receives the code and returns into Python to run it. Workers and the template run no Python
// after the fork, so the pages they share with each other stay shared.
#include "zygote.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <poll.h>
#include <signal.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <map>

#include "landlock.h"
#include "seccomp_filter.h"

namespace rci {
namespace {

double now_ms() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

// ---- small I/O helpers ----------------------------------------------------------------------

bool read_full(int fd, void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool write_full(int fd, const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t r = write(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// Writes all of buf to the non-blocking `fd`, waiting for room until deadline_ms (now_ms's clock):
// 1 when written, 0 when the deadline passed first, -1 when the pipe broke.
int write_until(int fd, const void* buf, size_t n, double deadline_ms) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    const ssize_t r = write(fd, p, n);
    if (r > 0) {
      p += r;
      n -= static_cast<size_t>(r);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r == 0 || errno != EAGAIN) return -1;
    const double left = deadline_ms - now_ms();
    if (left <= 0) return 0;
    pollfd w{fd, POLLOUT, 0};
    if (poll(&w, 1, static_cast<int>(std::ceil(left))) < 0 && errno != EINTR) return -1;
  }
  return 1;
}

// Appends what a non-blocking `fd` holds now (up to EOF or EAGAIN), up to `cap` bytes in all.
void drain_into(int fd, std::string& dst, size_t cap) {
  char buf[4096];
  while (dst.size() < cap) {
    ssize_t n = read(fd, buf, std::min(sizeof buf, cap - dst.size()));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    dst.append(buf, static_cast<size_t>(n));
  }
}

bool writev_full(int fd, iovec* iov, int cnt) {
  while (cnt > 0) {
    ssize_t r = writev(fd, iov, cnt);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    size_t done = static_cast<size_t>(r);
    while (cnt > 0 && done >= iov->iov_len) { done -= iov->iov_len; ++iov; --cnt; }
    if (cnt > 0) { iov->iov_base = static_cast<char*>(iov->iov_base) + done; iov->iov_len -= done; }
  }
  return true;
}

[[noreturn]] void die_in_child(const char* what, int err) {
  char msg[256];
  int n = snprintf(msg, sizeof msg, "rci_fast sandbox: %s failed: %s\n", what, strerror(err));
  if (n > 0) (void)!write(2, msg, static_cast<size_t>(n));
  _exit(125);
}

// Removes a folder tree without following symlinks (the run child owned its contents).
void remove_tree_at(int parent, const char* name) {
  if (unlinkat(parent, name, 0) == 0 || errno == ENOENT) return;
  int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return;
  fchmod(fd, 0700);  // a child may have made its folders unreadable
  DIR* d = fdopendir(fd);
  if (!d) { close(fd); return; }
  while (dirent* e = readdir(d)) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
    remove_tree_at(dirfd(d), e->d_name);
  }
  closedir(d);
  unlinkat(parent, name, AT_REMOVEDIR);
}

void remove_tree(const std::string& path) { remove_tree_at(AT_FDCWD, path.c_str()); }

uint64_t address_space_bytes(pid_t pid) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/statm", static_cast<int>(pid));
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[128] = {0};
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return 0;
  return strtoull(buf, nullptr, 10) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

// ---- the run child ----------------------------------------------------------------------------

struct Child {
  pid_t pid = -1;
  int control_w = -1;  // worker -> child: code
  int out_r = -1, err_r = -1, report_r = -1;
  int pidfd = -1;  // readable once the child has exited
  std::string scratch;
  bool session = false;
  std::string spawn_error;  // why spawn() gave no child (pid -1), for the run's error message
};

struct ChildSetup {
  const ZygoteConfig* config;
  const LandlockPaths* landlock_paths;
  int landlock_abi;
  pid_t worker_pid;
};

void set_limit(int resource, rlim_t value) {
  rlimit rl{value, value};
  if (setrlimit(resource, &rl) != 0) die_in_child("setrlimit", errno);
}

// A worker started as root keeps uid 0 when the interpreter's files are not readable by another
// uid; without capabilities that uid is an ordinary one (Landlock and seccomp do the rest).
void drop_capabilities() {
  for (int cap = 0; cap < 64 && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0; ++cap) {}
  prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2] = {};
  if (syscall(SYS_capset, &header, data) != 0) die_in_child("capset", errno);
}

// What a spare child remembers between its set-up and the lockdown.
struct SpareState {
  int run_uid, run_gid;
  bool has_ruleset;
  pid_t self, worker;
};
SpareState g_spare{};
constexpr char kReadyByte = 'R';
constexpr int kReadyTimeoutMs = 30000;  // a spare is ready in milliseconds; this is a hang

// Runs in the spare child right after fork: moves its descriptors in place and prepares its
// Landlock ruleset. The caller then unwinds into Python, which warms itself up and calls
// child_start(). (No C++ exception: the first throw in a process faults in the unwind tables.)
void spare_child(const ChildSetup& s, const std::string& scratch, int control_r, int out_w,
                 int err_w, int report_w) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != s.worker_pid) _exit(0);
  setsid();  // own session and process group: kill(0) and terminal signals reach only itself
  const pid_t self = getpid();

  int ruleset = -1;
  if (s.landlock_abi > 0) {
    int scratch_fd = open(scratch.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (scratch_fd < 0) die_in_child("open scratch", errno);
    ruleset = landlock_build_ruleset(s.landlock_abi, *s.landlock_paths, scratch_fd);
    if (ruleset < 0) die_in_child("landlock ruleset", -ruleset);
    close(scratch_fd);
  }
  // Move every descriptor the run keeps to a fixed number, then close all others.
  int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  int keep[] = {null_fd, out_w, err_w, control_r, report_w, ruleset};
  int high[6];
  for (int i = 0; i < 6; ++i) high[i] = keep[i] < 0 ? -1 : fcntl(keep[i], F_DUPFD_CLOEXEC, 100);
  for (int i = 0; i < 6; ++i)
    if (high[i] >= 0 && dup2(high[i], i) < 0) die_in_child("dup2", errno);
  syscall(SYS_close_range, 6, ~0u, 0);
  if (chdir(scratch.c_str()) != 0) die_in_child("chdir scratch", errno);
  g_spare = SpareState{s.config->run_uid, s.config->run_gid, ruleset >= 0, self, s.worker_pid};
}

int worker_uid(pid_t pid, uint64_t pid_namespace_inode) {
  return static_cast<int>(kWorkerUidBase + (static_cast<uint64_t>(pid) + pid_namespace_inode * kUidMix) % kWorkerUidSpan);
}

// ---- the worker -------------------------------------------------------------------------------

class Worker {
 public:
  Worker(int host_fd, const ZygoteConfig& config, const LandlockPaths& paths, int index)
      : host_(host_fd), config_(config), paths_(paths), index_(index) {
    setup_ = ChildSetup{&config_, &paths_, landlock_abi(), getpid()};
  }

  // Serves requests until the host closes the connection (then _exits). Returns only inside a
  // new spare child.
  void serve() {
    for (;;) {
      if (!idle_work()) return;
      RequestHeader h;
      if (!read_full(host_, &h, sizeof h) || h.magic != kRequestMagic) shutdown();
      std::string code(h.code_len, '\0');
      if (h.code_len && !read_full(host_, code.data(), h.code_len)) shutdown();
      switch (h.op) {
        case OP_RUN: run_fresh(h, code); break;
        case OP_SESSION_OPEN: session_open(h); break;
        case OP_SESSION_RUN: session_run(h, code); break;
        case OP_SESSION_CLOSE: session_close(h); break;
        default: respond_error(h.session_id, "unknown request"); break;
      }
    }
  }

 private:
  struct Outcome {
    ResponseHeader h{};
    std::string out, err;
    bool child_alive = false;  // session child finished a call and waits for the next
  };

  // Between requests: keep kSpares children forked and reap the dead, but stop as soon as a request
  // arrives (once at least one spare is ready). Returns false inside a new spare child.
  bool idle_work() {
    for (;;) {
      const bool pending = request_pending(0);
      reap(false);
      if (spares_.empty() || (!pending && spares_.size() < kSpares)) {
        Child c = spawn();
        if (c.pid < 0 && !graveyard_.empty()) {  // the dead may hold the space: free it, retry
          finish(c);
          reap(true);
          c = spawn();
        }
        if (c.pid == 0) return false;
        if (c.pid < 0 && !spares_.empty()) {  // keep serving with the spares we have
          finish(c);
          return true;
        }
        spares_.push_back(c);  // a failed spare (pid -1) makes the next request report the error
        if (c.pid < 0) return true;
        continue;
      }
      if (pending || graveyard_.empty()) return true;
      if (request_pending(1)) return true;
    }
  }

  bool request_pending(int timeout_ms) {
    pollfd p{host_, POLLIN, 0};
    return poll(&p, 1, timeout_ms) > 0;
  }

  // Forks a spare child. Returns {pid = 0} inside the child, {pid = -1} when the fork failed.
  Child spawn() {
    Child c;
    // pid stays -1 on failure: the next request reports spawn_error.
    auto failed = [&c](const char* what) {
      c.spawn_error = std::string(what) + ": " + strerror(errno);
      return c;
    };
    c.scratch = config_.scratch_root + "/w" + std::to_string(index_) + "-" + std::to_string(seq_++);
    if (mkdir(c.scratch.c_str(), 0700) != 0 && errno != EEXIST) return failed("mkdir of the run's folder");
    if (config_.run_uid >= 0 && chown(c.scratch.c_str(), config_.run_uid, config_.run_gid) != 0)
      return failed("chown of the run's folder to the run uid");
    int control[2], out[2], err[2], report[2];
    if (pipe2(control, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC) ||
        pipe2(report, O_CLOEXEC))
      return failed("pipe2");
    pid_t pid = fork();
    if (pid == 0) {
      spare_child(setup_, c.scratch, control[0], out[1], err[1], report[1]);
      Child me;
      me.pid = 0;
      return me;
    }
    close(control[0]); close(out[1]); close(err[1]); close(report[1]);
    if (pid < 0) {
      const int fork_errno = errno;
      close(control[1]); close(out[0]); close(err[0]); close(report[0]);
      errno = fork_errno;
      return failed("fork");
    }
    c.pid = pid;
    c.control_w = control[1];
    c.out_r = out[0];
    c.err_r = err[0];
    c.report_r = report[0];
    // The control pipe too: a session's code may stop reading it (by pointing descriptor 3
    // elsewhere), and a blocking write of the next code would then hold the worker forever.
    for (int fd : {c.control_w, c.out_r, c.err_r, c.report_r}) fcntl(fd, F_SETFL, O_NONBLOCK);
    c.pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));  // -1 before Linux 5.3
    if (c.pidfd >= 0) fcntl(c.pidfd, F_SETFD, FD_CLOEXEC);
    return c;
  }

  // Kills a child and closes its pipes. Reaping it and removing its scratch folder wait until the
  // kernel has torn down its address space (a millisecond or more), off the request path.
  void finish(Child& c) {
    if (c.pid > 0) kill(c.pid, SIGKILL);
    for (int fd : {c.control_w, c.out_r, c.err_r, c.report_r, c.pidfd})
      if (fd >= 0) close(fd);
    if (c.pid > 0 || !c.scratch.empty()) graveyard_.push_back(c);
    c = Child{};
  }

  void reap(bool block) {
    for (size_t i = 0; i < graveyard_.size();) {
      Child& g = graveyard_[i];
      if (g.pid > 0) {
        pid_t r;
        while ((r = waitpid(g.pid, nullptr, block ? 0 : WNOHANG)) < 0 && errno == EINTR) {}
        if (r == 0) { ++i; continue; }
      }
      if (!g.scratch.empty()) remove_tree(g.scratch);
      graveyard_[i] = graveyard_.back();
      graveyard_.pop_back();
    }
  }

  // Reaps while idle; returns as soon as the host sends the next request.
  void reap_until_request() {
    for (reap(false); !graveyard_.empty(); reap(false)) {
      pollfd p{host_, POLLIN, 0};
      if (poll(&p, 1, 1) != 0) return;
    }
  }

  Child take_spare() {  // idle_work() guarantees one; the oldest is the most likely warm
    Child c = spares_.front();
    spares_.pop_front();
    return c;
  }

  // The run's address-space limit: what the child maps now (a warm interpreter) plus its budget;
  // 0 when its size cannot be read. (The child sets its rlimits itself: set_run_limits.)
  static uint64_t address_space_limit(pid_t pid, const Limits& L) {
    const uint64_t base = address_space_bytes(pid);
    return base > 0 ? base + L.memory_bytes : 0;
  }

  // A spare announces with one byte on its report pipe that it has locked itself down.
  bool wait_ready(const Child& c) {
    pollfd p{c.report_r, POLLIN, 0};
    char byte = 0;
    return poll(&p, 1, kReadyTimeoutMs) == 1 && read(c.report_r, &byte, 1) == 1 && byte == kReadyByte;
  }

  // Hands `code` to the child and watches it until it reports, dies, times out or floods output.
  // `fresh_child`: the child runs its first code (a fresh run or a session's opening).
  Outcome supervise(Child& c, const std::string& code, const Limits& limits, bool session,
                    bool fresh_child) {
    Outcome o;
    o.h.magic = kResponseMagic;
    const double t0 = now_ms();
    ChildMessage m{kChildMagic, static_cast<uint32_t>(code.size()), session ? CHILD_SESSION : 0u, 0,
                   limits, 0};
    const double deadline = t0 + limits.timeout_s * 1e3;
    std::string failed;
    int sent = 1;  // write_until's answer for the message and code
    if (c.pid <= 0) failed = c.spawn_error.empty() ? "no run process" : c.spawn_error;
    else if (fresh_child && !wait_ready(c)) failed = "the run process died or hung while locking itself down";
    else if (fresh_child && (m.address_space_bytes = address_space_limit(c.pid, limits)) == 0)
      failed = "reading the run process's size (/proc/PID/statm) failed";
    else if ((sent = write_until(c.control_w, &m, sizeof m, deadline)) == 1)
      sent = write_until(c.control_w, code.data(), code.size(), deadline);
    if (failed.empty() && sent < 0) failed = "the pipe to the run process broke (the session ended)";
    if (!failed.empty()) {
      o.h.status = ST_ERROR;
      o.err = std::string("rci_fast sandbox: could not start a run: ") + failed + "\n";
      if (c.pid > 0) {  // the set-up writes why it gave up to its stderr (die_in_child, a traceback)
        std::string why;
        drain_into(c.err_r, why, 4096);
        if (!why.empty()) o.err += "its stderr:\n" + why;
      }
      o.h.flags |= RF_SESSION_ENDED;
      return o;
    }
    const size_t cap = limits.max_output_bytes;
    bool out_open = true, err_open = true, report_open = true, reported = false, exited = false;
    int killed_for = sent == 0 ? ST_TIMEOUT : -1;  // it did not take its code in time
    ChildReport rep{};
    size_t rep_have = 0;
    char buf[65536];

    auto drain = [&](int fd, std::string& dst, uint32_t trunc_flag, bool& open) {
      for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return;  // EAGAIN: nothing more for now
        if (n == 0) { open = false; return; }
        size_t room = cap > dst.size() ? cap - dst.size() : 0;
        dst.append(buf, std::min(room, static_cast<size_t>(n)));
        if (static_cast<size_t>(n) > room) { o.h.flags |= trunc_flag; killed_for = ST_OUTPUT; return; }
      }
    };

    // Ends on the report, the child's exit (its pidfd: the code may close the report pipe and go
    // on running), the deadline or too much output.
    while (killed_for < 0 && !reported && !exited) {
      double left = deadline - now_ms();
      if (left <= 0) { killed_for = ST_TIMEOUT; break; }
      if (!report_open && c.pidfd < 0) { exited = true; break; }  // no pidfd: EOF is the best sign
      pollfd p[4];
      int n = 0;
      if (out_open) p[n++] = {c.out_r, POLLIN, 0};
      if (err_open) p[n++] = {c.err_r, POLLIN, 0};
      if (report_open) p[n++] = {c.report_r, POLLIN, 0};
      if (c.pidfd >= 0) p[n++] = {c.pidfd, POLLIN, 0};
      int r = poll(p, n, static_cast<int>(std::ceil(left)));
      if (r < 0 && errno != EINTR) { killed_for = ST_ERROR; break; }
      if (r <= 0) continue;
      for (int i = 0; i < n; ++i) {
        if (!p[i].revents) continue;
        if (p[i].fd == c.out_r) drain(c.out_r, o.out, RF_STDOUT_TRUNCATED, out_open);
        else if (p[i].fd == c.err_r) drain(c.err_r, o.err, RF_STDERR_TRUNCATED, err_open);
        else if (p[i].fd == c.pidfd) exited = true;
        else {
          ssize_t k = read(c.report_r, reinterpret_cast<char*>(&rep) + rep_have, sizeof rep - rep_have);
          if (k == 0) report_open = false;
          else if (k > 0 && (rep_have += static_cast<size_t>(k)) == sizeof rep) reported = true;
        }
      }
    }
    o.h.wall_ms = now_ms() - t0;
    if (reported && rep.magic != kReportMagic) killed_for = ST_VIOLATION;  // forged by the code

    if (reported && killed_for < 0) {
      // Everything printed before the report is already in the pipes.
      if (out_open) drain(c.out_r, o.out, RF_STDOUT_TRUNCATED, out_open);
      if (err_open) drain(c.err_r, o.err, RF_STDERR_TRUNCATED, err_open);
      if (killed_for < 0) {
        o.h.exit_code = rep.exit_code;
        o.h.cpu_ms = rep.cpu_ms;
        o.h.max_rss_kb = rep.max_rss_kb;
        o.h.status = rep.exit_code == 0 ? ST_OK : (rep.flags & REPORT_MEMORY_ERROR) ? ST_MEMORY : ST_ERROR;
        o.child_alive = session;
        return o;
      }
    }
    // The child is gone or must go: kill it, collect what it printed, learn how it ended.
    if (killed_for >= 0) kill(c.pid, SIGKILL);
    int wstatus = 0;
    rusage ru{};
    while (wait4(c.pid, &wstatus, 0, &ru) < 0 && errno == EINTR) {}
    c.pid = -1;
    if (killed_for < 0) {
      if (out_open) drain(c.out_r, o.out, RF_STDOUT_TRUNCATED, out_open);
      if (err_open) drain(c.err_r, o.err, RF_STDERR_TRUNCATED, err_open);
    }
    o.h.cpu_ms = (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e3 +
                 (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e3;
    o.h.max_rss_kb = static_cast<uint64_t>(ru.ru_maxrss);
    if (WIFSIGNALED(wstatus)) o.h.term_signal = WTERMSIG(wstatus);
    if (WIFEXITED(wstatus)) o.h.exit_code = WEXITSTATUS(wstatus);
    if (killed_for >= 0) o.h.status = killed_for;
    else if (WIFSIGNALED(wstatus)) o.h.status = WTERMSIG(wstatus) == SIGXCPU ? ST_TIMEOUT : ST_VIOLATION;
    else o.h.status = o.h.exit_code == 0 ? ST_OK : ST_ERROR;
    if (session) o.h.flags |= RF_SESSION_ENDED;
    return o;
  }

  void respond(Outcome& o, uint32_t session_id) {
    o.h.session_id = session_id;
    o.h.stdout_len = static_cast<uint32_t>(o.out.size());
    o.h.stderr_len = static_cast<uint32_t>(o.err.size());
    iovec iov[3] = {{&o.h, sizeof o.h}, {o.out.data(), o.out.size()}, {o.err.data(), o.err.size()}};
    if (!writev_full(host_, iov, 3)) shutdown();
  }

  void respond_error(uint32_t session_id, const std::string& message) {
    Outcome o;
    o.h.magic = kResponseMagic;
    o.h.status = ST_ERROR;
    o.h.flags = RF_SESSION_ENDED;
    o.err = "rci_fast sandbox: " + message + "\n";
    respond(o, session_id);
  }

  void run_fresh(const RequestHeader& h, const std::string& code) {
    Child c = take_spare();
    Outcome o = supervise(c, code, h.limits, false, true);
    respond(o, 0);
    finish(c);  // reaping and the next fork happen after the host has its answer
  }

  void session_open(const RequestHeader& h) {
    if (sessions_.size() >= config_.max_sessions) return respond_error(0, "too many open sessions");
    Child c = take_spare();
    Outcome o = supervise(c, std::string(), h.limits, true, true);
    uint32_t id = 0;
    if (o.child_alive) { id = next_session_++; sessions_[id] = c; }
    respond(o, id);
    if (!o.child_alive) finish(c);
  }

  void session_run(const RequestHeader& h, const std::string& code) {
    auto it = sessions_.find(h.session_id);
    if (it == sessions_.end()) return respond_error(h.session_id, "unknown or ended session");
    Outcome o = supervise(it->second, code, h.limits, true, false);
    respond(o, h.session_id);
    if (!o.child_alive) { finish(it->second); sessions_.erase(it); }
  }

  void session_close(const RequestHeader& h) {
    auto it = sessions_.find(h.session_id);
    Outcome o;
    o.h.magic = kResponseMagic;
    o.h.status = ST_OK;
    o.h.flags = RF_SESSION_ENDED;
    respond(o, h.session_id);
    if (it != sessions_.end()) { finish(it->second); sessions_.erase(it); }
  }

  [[noreturn]] void shutdown() {
    for (auto& c : spares_) finish(c);
    for (auto& kv : sessions_) finish(kv.second);
    reap(true);
    _exit(0);
  }

  int host_;
  const ZygoteConfig& config_;
  const LandlockPaths& paths_;
  int index_;
  ChildSetup setup_{};
  static constexpr size_t kSpares = 2;
  std::deque<Child> spares_;
  std::map<uint32_t, Child> sessions_;
  std::vector<Child> graveyard_;  // killed, not yet reaped
  uint32_t next_session_ = 1;
  uint64_t seq_ = 0;
};

// ---- the template -----------------------------------------------------------------------------

bool send_fd(int sock, int fd, int32_t pid) {
  char control[CMSG_SPACE(sizeof(int))];
  memset(control, 0, sizeof control);
  iovec iov{&pid, sizeof pid};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &fd, sizeof fd);
  return sendmsg(sock, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(sizeof pid);
}

}  // namespace

bool mount_private_tmpfs(const std::string& path, uint64_t size_bytes, uint64_t max_inodes) {
  // A mount namespace of the template's own (inherited by workers and runs), so that the tmpfs
  // exists only for the sandbox and vanishes with it; needs CAP_SYS_ADMIN (root).
  if (unshare(CLONE_NEWNS) != 0) return false;
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return false;
  const std::string options = "size=" + std::to_string(size_bytes) +
                              ",nr_inodes=" + std::to_string(max_inodes) + ",mode=0711";
  return mount("rci-sandbox", path.c_str(), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
               options.c_str()) == 0;
}

void serve_template(int control_fd, const ZygoteConfig& config) {
  static LandlockPaths paths = open_landlock_paths(config.read_paths, config.rw_files);
  const pid_t template_pid = getpid();
  std::vector<pid_t> workers;
  int next_index = 0;
  for (;;) {
    pollfd p{control_fd, POLLIN, 0};
    int r = poll(&p, 1, 1000);
    // Reap workers that ended (the host noticed through their sockets).
    for (pid_t pid; (pid = waitpid(-1, nullptr, WNOHANG)) > 0;)
      workers.erase(std::remove(workers.begin(), workers.end(), pid), workers.end());
    if (r <= 0) continue;
    char cmd = 0;
    ssize_t n = read(control_fd, &cmd, 1);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {  // the host is gone or closed us: take every worker down with us
      for (pid_t pid : workers) kill(pid, SIGKILL);
      for (pid_t pid : workers) waitpid(pid, nullptr, 0);
      _exit(0);
    }
    if (cmd != 'W') continue;
    int sp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) != 0) {
      send_fd(control_fd, -1, -errno);
      continue;
    }
    pid_t pid = fork();
    if (pid == 0) {
      close(control_fd);
      close(sp[0]);
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != template_pid) _exit(0);
      // Re-initialise the interpreter's fork-sensitive state once here, so that run children,
      // which share these pages, do not each pay for it.
      if (config.after_fork_child) config.after_fork_child();
      ZygoteConfig own = config;  // lives as long as the worker: serve() returns only in a spare
      if (own.uid_per_worker) {
        struct stat ns{};
        own.run_uid = own.run_gid = worker_uid(getpid(), stat("/proc/self/ns/pid", &ns) == 0 ? ns.st_ino : 0);
      }
      Worker(sp[1], own, paths, next_index).serve();
      return;  // in a new spare child
    }
    close(sp[1]);
    if (pid > 0) {
      workers.push_back(pid);
      ++next_index;
      send_fd(control_fd, sp[0], pid);
    }
    close(sp[0]);
  }
}

// The run's rlimits, from its first message. The child sets its own: setting them from the worker
// with prlimit needs CAP_SYS_RESOURCE once the run has its own uid, which containers often withhold
// (the lent GPU machines do), while lowering one's own limits needs nothing. Having no capabilities
// left, the run cannot raise them again. A limit above the machine's own hard limit is held to it
// (so setrlimit should not fail; if it does, the run ends as an error, exit code 125, saying why).
void set_run_limits(const ChildMessage& m) {
  const Limits& L = m.limits;
  const rlim_t cpu = static_cast<rlim_t>(std::ceil(L.timeout_s)) + 1;
  const struct { int resource; rlim_t soft, hard; const char* name; } wanted[] = {
      {RLIMIT_CPU, cpu, cpu + 1, "RLIMIT_CPU"},  // soft: SIGXCPU, hard: SIGKILL
      {RLIMIT_AS, m.address_space_bytes, m.address_space_bytes, "RLIMIT_AS"},
      {RLIMIT_FSIZE, L.max_file_bytes, L.max_file_bytes, "RLIMIT_FSIZE"},
      {RLIMIT_NOFILE, L.max_open_files, L.max_open_files, "RLIMIT_NOFILE"},
      {RLIMIT_NPROC, L.max_threads, L.max_threads, "RLIMIT_NPROC"},  // tasks of the run uid
  };
  for (const auto& w : wanted) {
    if (w.resource == RLIMIT_NPROC && g_spare.run_uid < 0) continue;  // root's uid: NPROC is ignored
    rlimit now{};
    if (getrlimit(w.resource, &now) != 0) die_in_child(w.name, errno);
    const rlimit rl{std::min(w.soft, now.rlim_max), std::min(w.hard, now.rlim_max)};
    if (setrlimit(w.resource, &rl) != 0) die_in_child(w.name, errno);
  }
}

bool child_start(std::string* code, bool* session) {
  // Lock down first, before any code exists: nothing here depends on the request (the request's
  // rlimits are set below, from its message), so it all stays off the request path.
  set_limit(RLIMIT_CORE, 0);
  set_limit(RLIMIT_MEMLOCK, 0);
  set_limit(RLIMIT_MSGQUEUE, 0);
  if (g_spare.run_uid >= 0) {
    gid_t gid = static_cast<gid_t>(g_spare.run_gid);
    uid_t uid = static_cast<uid_t>(g_spare.run_uid);
    if (setgroups(0, nullptr) != 0) die_in_child("setgroups", errno);
    if (setresgid(gid, gid, gid) != 0) die_in_child("setresgid", errno);
    if (setresuid(uid, uid, uid) != 0) die_in_child("setresuid", errno);
  }
  drop_capabilities();
  // The uid change cleared the parent-death signal set at the fork: without it again, a run
  // would outlive a killed worker (orphaned, out of Sandbox.close()'s reach).
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != g_spare.worker) _exit(0);
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die_in_child("no_new_privs", errno);
  prctl(PR_SET_DUMPABLE, 0);  // other processes of the same uid cannot open its /proc files
  if (g_spare.has_ruleset) {
    int rc = landlock_restrict(kChildRulesetFd);
    if (rc != 0) die_in_child("landlock", -rc);
    close(kChildRulesetFd);
  }
  int rc = install_seccomp_filter(g_spare.self);
  if (rc != 0) die_in_child("seccomp", -rc);
  // Tell the worker it may send the run (its rlimits are set after the descriptor shuffle of the
  // set-up, which a low RLIMIT_NOFILE could break).
  if (!write_full(kChildReportFd, &kReadyByte, 1)) return false;

  ChildMessage m;
  if (!read_full(kChildControlFd, &m, sizeof m) || m.magic != kChildMagic) return false;
  set_run_limits(m);
  code->assign(m.code_len, '\0');
  if (m.code_len && !read_full(kChildControlFd, code->data(), m.code_len)) return false;
  *session = (m.flags & CHILD_SESSION) != 0;
  return true;
}

void child_report(int exit_code, bool memory_error) {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  ChildReport rep{kReportMagic, exit_code, memory_error ? REPORT_MEMORY_ERROR : 0u, 0,
                  (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e3 +
                      (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e3,
                  static_cast<uint64_t>(ru.ru_maxrss)};
  write_full(kChildReportFd, &rep, sizeof rep);
}

bool child_next(std::string* code) {
  ChildMessage m;
  if (!read_full(kChildControlFd, &m, sizeof m) || m.magic != kChildMagic) return false;
  code->assign(m.code_len, '\0');
  return m.code_len == 0 || read_full(kChildControlFd, code->data(), m.code_len);
}

}  // namespace rci
