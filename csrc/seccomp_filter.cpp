// The run child's syscall policy, as a seccomp-bpf program.
//
// Three outcomes:
//  - allowed: what CPython, numpy and sympy need to compute, read their files, write into the
//    scratch folder (Landlock decides which paths) and run threads;
//  - refused with an errno: things benign code may try and should see fail politely (sockets,
//    fork/posix_spawn, unknown syscalls; raising an rlimit, which the kernel refuses) -> Python
//    raises OSError;
//  - kill the process: things only an escape attempt does (ptrace, mount, namespaces, exec, uid
//    changes, kernel modules, bpf, ...) -> the run ends with status "violation".
#include "seccomp_filter.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

namespace rci {
namespace {

#if defined(__x86_64__)
constexpr uint32_t kArch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
constexpr uint32_t kArch = AUDIT_ARCH_AARCH64;
#else
#error "rci_fast sandbox: unsupported architecture (x86_64 and aarch64 are supported)"
#endif

constexpr uint32_t kNsFlags = CLONE_NEWNS | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET |
                              CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP;

constexpr uint32_t ret_errno(int e) { return SECCOMP_RET_ERRNO | (e & SECCOMP_RET_DATA); }
constexpr uint32_t kAllow = SECCOMP_RET_ALLOW;
constexpr uint32_t kKill = SECCOMP_RET_KILL_PROCESS;

constexpr uint32_t arg_lo(int i) { return offsetof(struct seccomp_data, args) + 8 * i; }
constexpr uint32_t arg_hi(int i) { return arg_lo(i) + 4; }

const long kAllowed[] = {
    SYS_read, SYS_write, SYS_readv, SYS_writev, SYS_pread64, SYS_pwrite64, SYS_preadv,
    SYS_pwritev, SYS_lseek, SYS_close, SYS_fstat, SYS_newfstatat, SYS_statx, SYS_statfs,
    SYS_fstatfs, SYS_faccessat, SYS_faccessat2, SYS_readlinkat, SYS_getdents64,
    SYS_getcwd, SYS_chdir, SYS_fchdir, SYS_mkdirat, SYS_unlinkat, SYS_renameat, SYS_renameat2,
    SYS_linkat, SYS_symlinkat, SYS_utimensat, SYS_truncate,
    SYS_ftruncate, SYS_fsync, SYS_fdatasync, SYS_flock, SYS_dup, SYS_dup3, SYS_pipe2,
    SYS_umask, SYS_sendfile, SYS_copy_file_range, SYS_splice, SYS_tee, SYS_fadvise64,
    SYS_close_range,
    SYS_mmap, SYS_munmap, SYS_mprotect, SYS_mremap, SYS_madvise, SYS_brk, SYS_msync, SYS_mincore,
    SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigreturn, SYS_rt_sigpending, SYS_rt_sigtimedwait,
    SYS_rt_sigsuspend, SYS_sigaltstack, SYS_getpid, SYS_gettid, SYS_getppid, SYS_getuid,
    SYS_geteuid, SYS_getgid, SYS_getegid, SYS_getgroups, SYS_getresuid, SYS_getresgid, SYS_getpgid,
    SYS_getsid, SYS_uname, SYS_getrandom, SYS_clock_gettime, SYS_clock_getres,
    SYS_clock_nanosleep, SYS_nanosleep, SYS_gettimeofday, SYS_times, SYS_getrusage, SYS_sysinfo,
    SYS_getitimer, SYS_setitimer, SYS_timer_create, SYS_timer_settime, SYS_timer_gettime,
    SYS_timer_getoverrun, SYS_timer_delete, SYS_futex, SYS_set_robust_list, SYS_get_robust_list,
    SYS_set_tid_address, SYS_rseq, SYS_membarrier, SYS_sched_yield, SYS_sched_getaffinity,
    SYS_sched_getparam, SYS_sched_getscheduler, SYS_sched_get_priority_max,
    SYS_sched_get_priority_min, SYS_getcpu, SYS_getpriority, SYS_exit, SYS_exit_group, SYS_wait4,
    SYS_waitid, SYS_ppoll, SYS_pselect6, SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_pwait,
    SYS_eventfd2,
#if defined(__x86_64__)
    SYS_stat, SYS_lstat, SYS_access, SYS_readlink, SYS_getdents, SYS_mkdir, SYS_rmdir,
    SYS_unlink, SYS_rename, SYS_link, SYS_symlink, SYS_dup2, SYS_pipe,
    SYS_poll, SYS_select, SYS_alarm, SYS_time, SYS_getpgrp, SYS_arch_prctl, SYS_epoll_wait,
    SYS_epoll_create, SYS_eventfd, SYS_utimes, SYS_futimesat, SYS_getrlimit,
#endif
#ifdef SYS_epoll_pwait2
    SYS_epoll_pwait2,
#endif
#ifdef SYS_futex_waitv
    SYS_futex_waitv,
#endif
};

// Only an escape attempt calls these: the process is killed (status "violation").
const long kForbidden[] = {
    SYS_ptrace, SYS_mount, SYS_umount2, SYS_unshare, SYS_setns, SYS_pivot_root, SYS_chroot,
    SYS_setuid, SYS_setgid, SYS_setreuid, SYS_setregid, SYS_setresuid, SYS_setresgid,
    SYS_setgroups, SYS_setfsuid, SYS_setfsgid, SYS_capset, SYS_init_module, SYS_finit_module,
    SYS_delete_module, SYS_kexec_load, SYS_reboot, SYS_bpf, SYS_perf_event_open, SYS_keyctl,
    SYS_add_key, SYS_request_key, SYS_process_vm_readv, SYS_process_vm_writev, SYS_userfaultfd,
    SYS_open_by_handle_at, SYS_name_to_handle_at, SYS_swapon, SYS_swapoff, SYS_syslog, SYS_acct,
    SYS_quotactl, SYS_settimeofday, SYS_clock_settime, SYS_clock_adjtime, SYS_adjtimex,
    SYS_sethostname, SYS_setdomainname, SYS_execve, SYS_execveat, SYS_io_uring_setup,
    SYS_io_uring_enter, SYS_io_uring_register, SYS_fanotify_init, SYS_vhangup, SYS_chown,
    SYS_fchown, SYS_fchownat, SYS_mknodat, SYS_kcmp, SYS_pidfd_getfd, SYS_pidfd_open,
    SYS_pidfd_send_signal, SYS_process_madvise, SYS_move_pages, SYS_migrate_pages,
#if defined(__x86_64__)
    SYS_iopl, SYS_ioperm, SYS_lchown, SYS_mknod, SYS_kexec_file_load, SYS_uselib,
    SYS_modify_ldt,
#endif
#ifdef SYS_open_tree
    SYS_open_tree, SYS_move_mount, SYS_fsopen, SYS_fsconfig, SYS_fsmount, SYS_fspick,
#endif
#ifdef SYS_mount_setattr
    SYS_mount_setattr,
#endif
};

class Program {
 public:
  void stmt(uint16_t code, uint32_t k) { p_.push_back(BPF_STMT(code, k)); }
  void jump(uint16_t code, uint32_t k, uint8_t jt, uint8_t jf) {
    p_.push_back(BPF_JUMP(code, k, jt, jf));
  }
  void ret(uint32_t action) { stmt(BPF_RET | BPF_K, action); }
  void load(uint32_t offset) { stmt(BPF_LD | BPF_W | BPF_ABS, offset); }
  // if (nr == syscall) return action;  (accumulator holds nr before and after)
  void on(long nr, uint32_t action) {
    jump(BPF_JMP | BPF_JEQ | BPF_K, static_cast<uint32_t>(nr), 0, 1);
    ret(action);
  }
  // Starts a block of `len` instructions run when nr == syscall; every path in it must return.
  void block(long nr, uint8_t len) { jump(BPF_JMP | BPF_JEQ | BPF_K, static_cast<uint32_t>(nr), 0, len); }
  // if (nr == syscall) return (low word of argument `arg` in values) ? allow : otherwise;
  void allow_if_arg_in(long nr, int arg, std::initializer_list<uint32_t> values, uint32_t otherwise) {
    const uint8_t n = static_cast<uint8_t>(values.size());
    block(nr, n + 3);
    load(arg_lo(arg));
    uint8_t i = 0;
    for (uint32_t v : values) jump(BPF_JMP | BPF_JEQ | BPF_K, v, static_cast<uint8_t>(n - i++), 0);
    ret(otherwise);
    ret(kAllow);
  }
  // if (nr == syscall) return (low word of argument `arg` & bits) ? refused : allow;
  void allow_unless_arg_has(long nr, int arg, uint32_t bits, uint32_t refused) {
    block(nr, 4);
    load(arg_lo(arg));
    jump(BPF_JMP | BPF_JSET | BPF_K, bits, 0, 1);
    ret(refused);
    ret(kAllow);
  }
  std::vector<sock_filter>& code() { return p_; }

 private:
  std::vector<sock_filter> p_;
};

std::vector<sock_filter> build(pid_t self_pid) {
  Program p;
  const uint32_t self = static_cast<uint32_t>(self_pid);
  p.load(offsetof(struct seccomp_data, arch));
  p.jump(BPF_JMP | BPF_JEQ | BPF_K, kArch, 1, 0);
  p.ret(kKill);
  p.load(offsetof(struct seccomp_data, nr));
#if defined(__x86_64__)
  p.jump(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u, 0, 1);  // x32 ABI numbers: never allowed
  p.ret(kKill);
#endif

  // Files: any mode but set-uid/set-gid (a run as uid 0 could leave a set-uid-root program where
  // another user may run it, when scratch is not on the sandbox's nosuid tmpfs). openat first:
  // the most frequent of all.
  constexpr uint32_t kSetId = S_ISUID | S_ISGID;
  p.allow_unless_arg_has(SYS_openat, 3, kSetId, ret_errno(EPERM));
  p.allow_unless_arg_has(SYS_fchmod, 1, kSetId, ret_errno(EPERM));
  p.allow_unless_arg_has(SYS_fchmodat, 2, kSetId, ret_errno(EPERM));
#if defined(__x86_64__)
  p.allow_unless_arg_has(SYS_open, 2, kSetId, ret_errno(EPERM));
  p.allow_unless_arg_has(SYS_chmod, 1, kSetId, ret_errno(EPERM));
  p.allow_unless_arg_has(SYS_creat, 1, kSetId, ret_errno(EPERM));
#endif

  // clone: threads only. Namespace flags are an escape attempt; fork/vfork/posix_spawn get EPERM.
  p.block(SYS_clone, 6);
  p.load(arg_lo(0));
  p.jump(BPF_JMP | BPF_JSET | BPF_K, kNsFlags, 0, 1);
  p.ret(kKill);
  p.jump(BPF_JMP | BPF_JSET | BPF_K, CLONE_THREAD, 1, 0);
  p.ret(ret_errno(EPERM));
  p.ret(kAllow);
  // clone3 passes its flags in memory, which seccomp cannot read: ENOSYS makes glibc use clone.
  p.on(SYS_clone3, ret_errno(ENOSYS));
#if defined(__x86_64__)
  p.on(SYS_fork, ret_errno(EPERM));
  p.on(SYS_vfork, ret_errno(EPERM));
#endif

  // kill(pid, sig): only itself (pid 0 is its own process group, which holds only itself).
  p.block(SYS_kill, 5);
  p.load(arg_lo(0));
  p.jump(BPF_JMP | BPF_JEQ | BPF_K, self, 2, 0);
  p.jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0);
  p.ret(ret_errno(EPERM));
  p.ret(kAllow);
  // tgkill(tgid, tid, sig): threads of its own process only (raise(), pthread_kill()).
  p.block(SYS_tgkill, 4);
  p.load(arg_lo(0));
  p.jump(BPF_JMP | BPF_JEQ | BPF_K, self, 1, 0);
  p.ret(ret_errno(EPERM));
  p.ret(kAllow);
  p.on(SYS_tkill, ret_errno(EPERM));

  // prlimit64(0, resource, new, old): its own limits only. Reading any; changing only the five
  // the child sets for a run after this filter is in (NPROC only when runs have their own uid;
  // for root's uid the kernel ignores it): without capabilities the run can lower them or move a
  // soft one up to its hard one (equal but for CPU's one second), never raise a hard one (the
  // kernel refuses, EPERM). Others (stack, core, ...) keep what they were.
  p.block(SYS_prlimit64, 14);
  p.load(arg_lo(0));
  p.jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 10);  // another process: EPERM
  p.load(arg_lo(2));
  p.jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 2);   // new != NULL: look at the resource
  p.load(arg_hi(2));
  p.jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 7, 0);   // new == NULL: a read, allowed
  p.load(arg_lo(1));
  p.jump(BPF_JMP | BPF_JEQ | BPF_K, RLIMIT_CPU, 5, 0);
  p.jump(BPF_JMP | BPF_JEQ | BPF_K, RLIMIT_AS, 4, 0);
  p.jump(BPF_JMP | BPF_JEQ | BPF_K, RLIMIT_FSIZE, 3, 0);
  p.jump(BPF_JMP | BPF_JEQ | BPF_K, RLIMIT_NOFILE, 2, 0);
  p.jump(BPF_JMP | BPF_JEQ | BPF_K, RLIMIT_NPROC, 1, 0);
  p.ret(ret_errno(EPERM));
  p.ret(kAllow);

  // ioctl: the terminal/fd queries Python's io layer makes; anything else is "not a tty".
  p.allow_if_arg_in(SYS_ioctl, 1, {TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIOCLEX, FIONCLEX},
                    ret_errno(ENOTTY));
  // fcntl: descriptor flags, status flags, locks, duplicates. Not F_SETOWN(_EX)/F_SETSIG: a
  // descriptor's SIGIO goes to the owner it names, a signal the kernel lets a uid-0 run send to
  // any process (kill() is filtered, this path is not; Landlock scopes signals only from ABI 6,
  // Linux 6.12); nor leases, dnotify or resizing a pipe (the worker's control pipe among them).
  p.allow_if_arg_in(SYS_fcntl, 1, {F_DUPFD, F_DUPFD_CLOEXEC, F_GETFD, F_SETFD, F_GETFL, F_SETFL,
                                   F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK,
                                   F_OFD_SETLKW, F_GETOWN, F_GETSIG, F_GETPIPE_SZ},
                    ret_errno(EPERM));
  // prctl: thread names (threading sets them) and read-only queries.
  p.allow_if_arg_in(SYS_prctl, 0, {PR_SET_NAME, PR_GET_NAME, PR_GET_DUMPABLE, PR_GET_SECCOMP,
                                   PR_GET_NO_NEW_PRIVS, PR_CAPBSET_READ},
                    ret_errno(EPERM));

  for (long nr : kAllowed) p.on(nr, kAllow);  // the hot ones (read, write, mmap) come first
  for (long nr : kForbidden) p.on(nr, kKill);
  // Everything else (sockets, setrlimit, seccomp, ...) fails politely.
  p.ret(ret_errno(EPERM));
  return std::move(p.code());
}

}  // namespace

int install_seccomp_filter(pid_t self_pid) {
  std::vector<sock_filter> code = build(self_pid);
  sock_fprog prog{static_cast<unsigned short>(code.size()), code.data()};
  if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) return -errno;
  return 0;
}

int seccomp_filter_length() { return static_cast<int>(build(getpid()).size()); }

}  // namespace rci
