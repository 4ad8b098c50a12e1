// The host function table (cfx_host) every plugin receives.
#include <boost/json.hpp>

#include "conflux/kernels.h"
#include "conflux/log.h"
#include "conflux/plugin_context.h"
#include "conflux/plugin_registry.h"

void cfx_context::fail(std::string message) {
  std::lock_guard lock(mu_);
  if (failed_) return;
  failed_ = true;
  failure_ = std::move(message);
}

bool cfx_context::failed() const {
  std::lock_guard lock(mu_);
  return failed_;
}

std::string cfx_context::failure() const {
  std::lock_guard lock(mu_);
  return failure_;
}

namespace conflux {
namespace {

void host_log(cfx_context* ctx, std::int32_t level, const char* message) {
  const LogLevel l = level <= CFX_LOG_DEBUG ? LogLevel::debug
                     : level == CFX_LOG_INFO ? LogLevel::info
                     : level == CFX_LOG_WARNING ? LogLevel::warning
                                                : LogLevel::error;
  std::string line;
  if (ctx) line = "job '" + ctx->job + "': " + ctx->strategy + ": ";
  line += message ? message : "(null)";
  log_line(l, line);
}

void host_fail(cfx_context* ctx, const char* message) {
  if (ctx) ctx->fail(message ? message : "strategy failed without a message");
}

std::int32_t host_set_report(cfx_context* ctx, const char* json_object) {
  if (!ctx || !json_object) return 1;
  boost::json::error_code ec;
  const boost::json::value v = boost::json::parse(json_object, ec);
  if (ec || !v.is_object()) return 1;
  ctx->report = json_object;
  return 0;
}

std::uint64_t host_random_key(std::uint64_t seed, const char* name, std::uint32_t model) {
  return random_key(seed, name ? name : "", model);
}

void host_random_uniform(std::uint64_t key, std::uint64_t first, std::uint64_t n, float* out) {
  random_uniform(key, first, static_cast<std::size_t>(n), out);
}

void host_axpy(float a, const float* x, float* y, std::uint64_t n) { axpy_f32(a, x, y, static_cast<std::size_t>(n)); }
void host_scale(float a, float* y, std::uint64_t n) { scale_f32(a, y, static_cast<std::size_t>(n)); }
double host_dot(const float* x, const float* y, std::uint64_t n) { return dot_f32(x, y, static_cast<std::size_t>(n)); }

const cfx_host kHost = {
    sizeof(cfx_host), CFX_ABI_MAJOR, CFX_ABI_MINOR, host_log,  host_fail, host_set_report,
    host_random_key,  host_random_uniform,         host_axpy, host_scale, host_dot,
};

}  // namespace

const cfx_host* host_table() { return &kHost; }

}  // namespace conflux
