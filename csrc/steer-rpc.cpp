// steer-gguf: llama.cpp's RPC devices (a model split across machines), for the Python bridge.
//
// Registering a server makes its devices ordinary offload targets: llama.cpp puts RPC devices
// first in its default device list, so --n-gpu-layers decides how many layers go remote.
// ggml's RPC client aborts the process when a server stops answering (ggml-rpc.cpp's
// RPC_STATUS_ASSERT, in its dispatcher thread): the abort callback installed here turns that
// into one error line and exit status 2, the CLI's error status, instead of a core dump; the
// client's own log line just before it (a failed send/recv, a protocol mismatch) joins that line.
// A server that hangs without closing the connection would leave the client waiting for ever:
// engine/rpc.py gives this process's connections a send/receive timeout, and a recv that runs out
// of it is reported as the server not answering.
#include "ggml.h"
#include "ggml-backend.h"

#include <pybind11/pybind11.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <unistd.h>

namespace py = pybind11;

namespace {

std::set<std::string> g_endpoints;      // registered servers, each once (a second register doubles devices)
char g_endpoint_list[1024] = "";        // the same, for the abort callback (no allocation there)
char g_transport_note[256] = "";        // the swallowed transport failure line
int g_transport_errno = 0;              // errno of that failure (EAGAIN: the timeout ran out)
double g_timeout_s = 0;                 // the connections' send/receive timeout (engine/rpc.py), 0: none
ggml_abort_callback_t g_previous = nullptr;
ggml_log_callback g_log_previous = nullptr;
void * g_log_previous_data = nullptr;
bool g_installed = false;

void on_log(ggml_log_level level, const char * text, void * data) {
    const int err = errno;  // the failed send/recv's, logged right after it
    // ggml-rpc logs a failed send/recv or a protocol mismatch, then the client aborts: keep the
    // line for the abort's
    if (level == GGML_LOG_LEVEL_ERROR && text &&
        (std::strncmp(text, "send failed", 11) == 0 || std::strncmp(text, "recv failed", 11) == 0 ||
         std::strncmp(text, "RPC server version mismatch", 27) == 0)) {
        g_transport_errno = err;
        std::snprintf(g_transport_note, sizeof(g_transport_note), "%s", text);
        g_transport_note[std::strcspn(g_transport_note, "\n")] = '\0';
        return;
    }
    if (g_log_previous) {
        g_log_previous(level, text, g_log_previous_data);
    } else {
        std::fputs(text, stderr);
    }
    (void) data;
}

void on_abort(const char * message) {
    // only the RPC client's aborts become an error line; any other is printed as ggml prints it
    // (less its backtrace) and aborts as before
    if (message && std::strstr(message, "ggml-rpc")) {
        const char * text = std::strstr(message, ": ");  // drop the source file:line prefix
        text = text ? text + 2 : message;
        const int len = (int) std::strcspn(text, "\n");  // some messages end in a newline
        if (g_timeout_s > 0 && (g_transport_errno == EAGAIN || g_transport_errno == EWOULDBLOCK)) {
            std::fprintf(stderr, "steer-gguf: error: an RPC server stopped answering (%s): no answer within "
                         "%g s (STEER_GGUF_RPC_TIMEOUT sets the wait; 0 waits for ever)\n", g_endpoint_list,
                         g_timeout_s);
            std::fflush(stderr);
            _exit(2);
        }
        std::fprintf(stderr, "steer-gguf: error: lost the connection to an RPC server (%s): %.*s%s%s%s\n",
                     g_endpoint_list, len, text, g_transport_note[0] ? " (" : "", g_transport_note,
                     g_transport_note[0] ? ")" : "");
        std::fflush(stderr);
        _exit(2);
    }
    if (g_previous) {
        g_previous(message);
    } else {
        std::fprintf(stderr, "%s\n", message ? message : "ggml abort");
    }
}

using add_server_fn = ggml_backend_reg_t (*)(const char * endpoint);

add_server_fn add_server() {
    ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
    return rpc ? (add_server_fn) ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server") : nullptr;
}

}  // namespace

void steer_rpc_bind(py::module_ & m) {
    m.def("rpc_available", [] { return add_server() != nullptr; },
          "whether this build has llama.cpp's RPC backend (CMAKE_ARGS=-DGGML_RPC=ON)");
    m.def("rpc_set_timeout", [](double seconds) { g_timeout_s = seconds; }, py::arg("seconds"),
          "the send/receive timeout engine/rpc.py gave the connections, for the abort's error line");
    m.def("rpc_add_server", [](const std::string & endpoint) -> py::tuple {
        // (devices the server added, error message or ""): the caller has checked that the
        // endpoint accepts connections, so the client's own connect is expected to succeed
        add_server_fn fn = add_server();
        if (!fn) {
            return py::make_tuple(0, "this build has no RPC backend (rebuild with CMAKE_ARGS=-DGGML_RPC=ON)");
        }
        if (g_endpoints.count(endpoint)) {
            return py::make_tuple(0, "");
        }
        if (!g_installed) {
            g_previous = ggml_set_abort_callback(on_abort);
            ggml_log_get(&g_log_previous, &g_log_previous_data);
            ggml_log_set(on_log, nullptr);
            g_installed = true;
        }
        std::string list;
        for (const std::string & e : g_endpoints) {
            list += e + ", ";
        }
        list += endpoint;
        std::snprintf(g_endpoint_list, sizeof(g_endpoint_list), "%s", list.c_str());
        ggml_backend_reg_t reg = fn(endpoint.c_str());  // connects and shakes hands (GIL held: one at a time)
        if (!reg) {
            return py::make_tuple(0, "the server reports no devices");
        }
        ggml_backend_register(reg);
        g_endpoints.insert(endpoint);
        return py::make_tuple((int) ggml_backend_reg_dev_count(reg), "");
    }, py::arg("endpoint"), "register an rpc-server's devices as offload targets (once per endpoint)");
}
