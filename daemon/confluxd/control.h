// The control socket: a Unix stream socket speaking JSON lines. One request object per line
// ({"cmd": "status"}, {"cmd": "run", "job": "x"}, {"cmd": "cancel", "job": "x"},
// {"cmd": "reload"}), one response object per line ({"ok": true, ...} or
// {"ok": false, "error": "..."}). Mode 0600, or 0660 owned by `group` when one is configured.
#pragma once

#include <filesystem>
#include <functional>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/json/object.hpp>

namespace conflux::daemon {

class ControlServer {
 public:
  using Handler = std::function<boost::json::object(const boost::json::object&)>;

  ControlServer(boost::asio::io_context& io, std::filesystem::path socket, std::string group, Handler handler);
  ~ControlServer();  // removes the socket file

  // Binds and listens. A stale socket file (no daemon behind it) is replaced; a live one means
  // another daemon runs: std::runtime_error.
  void start();
  const std::filesystem::path& path() const { return path_; }

 private:
  void accept();

  boost::asio::io_context& io_;
  std::filesystem::path path_;
  std::string group_;
  Handler handler_;
  boost::asio::local::stream_protocol::acceptor acceptor_;
  bool bound_ = false;
};

}  // namespace conflux::daemon
