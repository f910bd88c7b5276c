// Wire format between the Python host, the workers and the run children.
// Fixed little-endian headers followed by payload bytes; both ends live on one machine.
#pragma once
#include <cstdint>

namespace rci {

constexpr uint32_t kRequestMagic = 0x51494352;   // "RCIQ"
constexpr uint32_t kResponseMagic = 0x52494352;  // "RCIR"
constexpr uint32_t kChildMagic = 0x43494352;     // "RCIC": worker -> child
constexpr uint32_t kReportMagic = 0x53494352;    // "RCIS": child -> worker

enum Op : uint32_t { OP_RUN = 1, OP_SESSION_OPEN = 2, OP_SESSION_RUN = 3, OP_SESSION_CLOSE = 4 };

// Result status; the Python side maps these to strings.
enum Status : int32_t {
  ST_OK = 0, ST_ERROR = 1, ST_TIMEOUT = 2, ST_MEMORY = 3, ST_OUTPUT = 4, ST_VIOLATION = 5,
};

struct Limits {
  double timeout_s;
  uint64_t memory_bytes;      // address space allowed beyond what the warm interpreter maps
  uint64_t max_output_bytes;  // per stream; more kills the run with ST_OUTPUT
  uint64_t max_file_bytes;    // RLIMIT_FSIZE
  uint32_t max_open_files;    // RLIMIT_NOFILE
  uint32_t max_threads;       // RLIMIT_NPROC when the run drops to its own uid
};

struct RequestHeader {
  uint32_t magic;
  uint32_t op;
  uint32_t session_id;
  uint32_t code_len;
  Limits limits;
};

enum ResponseFlags : uint32_t { RF_STDOUT_TRUNCATED = 1, RF_STDERR_TRUNCATED = 2, RF_SESSION_ENDED = 4 };

struct ResponseHeader {
  uint32_t magic;
  int32_t status;
  int32_t exit_code;
  int32_t term_signal;
  uint32_t session_id;
  uint32_t flags;
  double wall_ms;
  double cpu_ms;
  uint64_t max_rss_kb;
  uint32_t stdout_len;
  uint32_t stderr_len;
};

enum ChildFlags : uint32_t { CHILD_SESSION = 1 };  // keep the child alive for more code

struct ChildMessage {  // worker -> child on the control pipe, then code_len bytes of code
  uint32_t magic;
  uint32_t code_len;
  uint32_t flags;
  uint32_t pad;
  Limits limits;
  uint64_t address_space_bytes;  // RLIMIT_AS: what the child maps now + limits.memory_bytes
};

enum ReportFlags : uint32_t { REPORT_MEMORY_ERROR = 1 };

struct ChildReport {  // child -> worker on the report pipe, after each piece of code
  uint32_t magic;
  int32_t exit_code;
  uint32_t flags;
  uint32_t pad;
  double cpu_ms;
  uint64_t max_rss_kb;
};

// Fixed descriptor numbers inside a run child.
constexpr int kChildControlFd = 3;
constexpr int kChildReportFd = 4;
constexpr int kChildRulesetFd = 5;

}  // namespace rci
