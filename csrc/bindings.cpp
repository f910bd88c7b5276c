// pybind11 bindings of the sandbox core (import name rci_fast.sandbox._core).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "landlock.h"
#include "protocol.h"
#include "seccomp_filter.h"
#include "zygote.h"

namespace py = pybind11;

namespace {

void after_fork_child() { PyOS_AfterFork_Child(); }

// Runs the template loop. Returns (None) only inside a new spare child, not yet locked down.
void serve_template(int control_fd, const std::string& scratch_root,
                         const std::vector<std::string>& read_paths,
                         const std::vector<std::string>& rw_files, int run_uid, int run_gid,
                         bool uid_per_worker, uint32_t max_sessions) {
  rci::ZygoteConfig config;
  config.scratch_root = scratch_root;
  config.read_paths = read_paths;
  config.rw_files = rw_files;
  config.run_uid = run_uid;
  config.run_gid = run_gid;
  config.uid_per_worker = uid_per_worker;
  config.max_sessions = max_sessions;
  config.after_fork_child = after_fork_child;
  rci::serve_template(control_fd, config);
}

// Waits for the first code, locks the process down, returns (code, session) or None.
py::object child_start() {
  std::string code;
  bool session = false, ok;
  {
    py::gil_scoped_release release;
    ok = rci::child_start(&code, &session);
  }
  if (!ok) return py::none();
  return py::make_tuple(py::bytes(code), session);
}

py::object child_next() {
  std::string code;
  bool ok;
  {
    py::gil_scoped_release release;  // threads of a session keep running between calls
    ok = rci::child_next(&code);
  }
  if (!ok) return py::none();
  return py::bytes(code);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "rci_fast sandbox core: fork server, seccomp filter and Landlock rules (Linux).";
  m.def("serve_template", &serve_template, py::arg("control_fd"), py::arg("scratch_root"),
        py::arg("read_paths"), py::arg("rw_files"), py::arg("run_uid"), py::arg("run_gid"),
        py::arg("uid_per_worker"), py::arg("max_sessions"));
  m.def("child_start", &child_start);
  m.def("child_report", &rci::child_report, py::arg("exit_code"), py::arg("memory_error"));
  m.def("child_next", &child_next);
  m.def("mount_private_tmpfs", &rci::mount_private_tmpfs, py::arg("path"), py::arg("size_bytes"),
        py::arg("max_inodes"));
  m.def("landlock_abi", &rci::landlock_abi);
  m.def("seccomp_filter_length", &rci::seccomp_filter_length);
  m.attr("REQUEST_HEADER_SIZE") = sizeof(rci::RequestHeader);
  m.attr("RESPONSE_HEADER_SIZE") = sizeof(rci::ResponseHeader);
}
