#include "control.h"

#include <grp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <istream>
#include <memory>
#include <stdexcept>

#include <boost/asio/read_until.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/write.hpp>
#include <boost/json.hpp>

#include "conflux/log.h"

namespace conflux::daemon {

namespace asio = boost::asio;
namespace json = boost::json;
using local = asio::local::stream_protocol;

namespace {

// One client connection: read a line, answer a line, until the client closes.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(local::socket socket, const ControlServer::Handler& handler)
      : socket_(std::move(socket)), handler_(handler), buf_(64 * 1024) {}

  void read() {
    asio::async_read_until(socket_, buf_, '\n', [self = shared_from_this()](const boost::system::error_code& ec, std::size_t) {
      if (ec) return;  // closed, or a line longer than the limit
      std::istream in(&self->buf_);
      std::string line;
      std::getline(in, line);
      json::object reply;
      try {
        const json::value v = json::parse(line);
        if (!v.is_object()) throw std::runtime_error("a request is a JSON object");
        reply = self->handler_(v.as_object());
      } catch (const std::exception& e) {
        reply = json::object{{"ok", false}, {"error", std::string("bad request: ") + e.what()}};
      }
      self->out_ = json::serialize(reply) + "\n";
      asio::async_write(self->socket_, asio::buffer(self->out_),
                        [self](const boost::system::error_code& wec, std::size_t) {
                          if (!wec) self->read();
                        });
    });
  }

 private:
  local::socket socket_;
  const ControlServer::Handler& handler_;
  asio::streambuf buf_;
  std::string out_;
};

}  // namespace

ControlServer::ControlServer(asio::io_context& io, std::filesystem::path socket, std::string group, Handler handler)
    : io_(io), path_(std::move(socket)), group_(std::move(group)), handler_(std::move(handler)), acceptor_(io) {}

ControlServer::~ControlServer() {
  if (bound_) ::unlink(path_.c_str());
}

void ControlServer::start() {
  std::error_code ec;
  std::filesystem::create_directories(path_.parent_path(), ec);
  if (std::filesystem::exists(std::filesystem::symlink_status(path_, ec))) {
    local::socket probe(io_);
    boost::system::error_code pec;
    probe.connect(local::endpoint(path_.string()), pec);
    if (!pec) throw std::runtime_error(path_.string() + ": another confluxd is listening on this control socket");
    ::unlink(path_.c_str());  // stale: left by a daemon that died
  }
  // Create the socket with no access for others, then open it up as configured.
  const mode_t old = ::umask(0177);
  boost::system::error_code bec;
  acceptor_.open(local(), bec);
  if (!bec) acceptor_.bind(local::endpoint(path_.string()), bec);
  ::umask(old);
  if (bec) throw std::runtime_error(path_.string() + ": cannot bind the control socket: " + bec.message());
  bound_ = true;
  if (!group_.empty()) {
    const group* g = ::getgrnam(group_.c_str());
    if (!g) throw std::runtime_error("[daemon].socket_group: no group named '" + group_ + "'");
    if (::chown(path_.c_str(), static_cast<uid_t>(-1), g->gr_gid) != 0 || ::chmod(path_.c_str(), 0660) != 0)
      throw std::runtime_error(path_.string() + ": cannot give the control socket to group '" + group_ +
                               "': " + std::strerror(errno));
  } else {
    ::chmod(path_.c_str(), 0600);
  }
  acceptor_.listen(asio::socket_base::max_listen_connections, bec);
  if (bec) throw std::runtime_error(path_.string() + ": cannot listen: " + bec.message());
  accept();
}

void ControlServer::accept() {
  acceptor_.async_accept([this](const boost::system::error_code& ec, local::socket socket) {
    if (ec == asio::error::operation_aborted) return;
    if (!ec) std::make_shared<Session>(std::move(socket), handler_)->read();
    accept();
  });
}

}  // namespace conflux::daemon
