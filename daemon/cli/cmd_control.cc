// conflux status|run JOB|cancel JOB|reload: talk to a running confluxd over its control socket
// (JSON lines; see daemon/confluxd/control.h).
#include <cstdio>
#include <iostream>
#include <string>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/write.hpp>
#include <boost/json.hpp>
#include <boost/program_options.hpp>

#include "commands.h"
#include "conflux/config.h"
#include "format.h"

namespace conflux::cli {

namespace po = boost::program_options;
namespace json = boost::json;
namespace asio = boost::asio;

namespace {

// The socket: --socket, else the configuration's [daemon].control_socket, else the default.
std::string socket_path(const po::variables_map& vm) {
  if (vm.count("socket")) return vm["socket"].as<std::string>();
  if (vm.count("config")) return control_socket_of(vm["config"].as<std::string>()).string();
  return DaemonConfig{}.control_socket.string();
}

json::object request(const std::string& socket, const json::object& req) {
  asio::io_context io;
  asio::local::stream_protocol::socket s(io);
  boost::system::error_code ec;
  s.connect(asio::local::stream_protocol::endpoint(socket), ec);
  if (ec)
    throw std::runtime_error(socket + ": cannot reach confluxd (" + ec.message() +
                             "); is it running? (--socket PATH or --config FILE names its control socket)");
  const std::string line = json::serialize(req) + "\n";
  asio::write(s, asio::buffer(line));
  asio::streambuf buf;
  asio::read_until(s, buf, '\n');
  std::istream in(&buf);
  std::string reply;
  std::getline(in, reply);
  return json::parse(reply).as_object();
}

std::string str(const json::value& v) { return v.is_string() ? std::string(v.as_string()) : std::string(); }

void print_status(const json::object& r) {
  std::printf("confluxd %s (pid %lld), config %s\n", str(r.at("version")).c_str(),
              static_cast<long long>(r.at("pid").to_number<std::int64_t>()), str(r.at("config")).c_str());
  for (const auto& jv : r.at("jobs").as_array()) {
    const json::object& j = jv.as_object();
    std::string state = str(j.at("state"));
    if (state == "running") {
      char buf[32];
      std::snprintf(buf, sizeof buf, " %.0f%%", j.at("progress").to_number<double>());
      state += buf;
    }
    std::printf("  %-20s %-12s %-16s runs %llu\n", str(j.at("name")).c_str(), state.c_str(), str(j.at("strategy")).c_str(),
                static_cast<unsigned long long>(j.at("runs").to_number<std::uint64_t>()));
    if (const auto* w = j.if_contains("waiting_for")) std::printf("      waiting: %s\n", str(*w).c_str());
    for (const auto& in : j.at("inputs").as_array()) std::printf("      input: %s\n", str(in).c_str());
    if (!j.at("last_result").is_null()) {
      const json::object& l = j.at("last_result").as_object();
      std::printf("      last: %s %s (%.1f s)\n", l.at("ok").as_bool() ? "ok" : "failed", str(l.at("output")).c_str(),
                  l.at("seconds").to_number<double>());
    }
    if (!j.at("last_error").is_null()) std::printf("      error: %s\n", str(j.at("last_error")).c_str());
  }
}

}  // namespace

int cmd_control(const char* command, int argc, char** argv) {
  const std::string cmd = command;
  const bool takes_job = cmd == "run" || cmd == "cancel";
  po::options_description visible("usage: conflux " + cmd + (takes_job ? " JOB" : "") +
                                  " [--socket PATH | --config FILE]" + (cmd == "status" ? " [--json]" : "") +
                                  "\n\nTalks to a running confluxd over its control socket.\n\noptions");
  visible.add_options()("socket", po::value<std::string>(), "the daemon's control socket")(
      "config", po::value<std::string>(), "read the socket path from this configuration")("help,h", "show this help");
  if (cmd == "status") visible.add_options()("json", "print the daemon's JSON answer");
  po::options_description all;
  all.add(visible).add_options()("job", po::value<std::string>());
  po::positional_options_description pos;
  if (takes_job) pos.add("job", 1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(all).positional(pos).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::fprintf(stderr, "conflux %s: %s (try 'conflux %s --help')\n", command, e.what(), command);
    return kExitUsage;
  }
  if (vm.count("help")) {
    std::cout << visible << "\n";
    return kExitOk;
  }
  if (takes_job && !vm.count("job")) {
    std::fprintf(stderr, "conflux %s: missing JOB\n", command);
    return kExitUsage;
  }
  try {
    json::object req{{"cmd", cmd}};
    if (takes_job) req["job"] = vm["job"].as<std::string>();
    const json::object r = request(socket_path(vm), req);
    if (!r.at("ok").as_bool()) {
      std::fprintf(stderr, "conflux %s: %s\n", command, str(r.at("error")).c_str());
      return kExitFailed;
    }
    if (cmd == "status") {
      if (vm.count("json")) std::cout << json::serialize(r) << "\n";
      else print_status(r);
    } else if (const auto* m = r.if_contains("message")) {
      std::printf("%s\n", str(*m).c_str());
    }
    return kExitOk;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "conflux %s: %s\n", command, e.what());
    return kExitFailed;
  }
}

int cmd_status(int argc, char** argv) { return cmd_control("status", argc, argv); }
int cmd_run(int argc, char** argv) { return cmd_control("run", argc, argv); }
int cmd_cancel(int argc, char** argv) { return cmd_control("cancel", argc, argv); }
int cmd_reload(int argc, char** argv) { return cmd_control("reload", argc, argv); }

}  // namespace conflux::cli
