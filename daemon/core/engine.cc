#include "conflux/engine.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>

#include <tbb/blocked_range.h>
#include <tbb/enumerable_thread_specific.h>
#include <tbb/parallel_for.h>
#include <tbb/parallel_reduce.h>
#include <tbb/partitioner.h>
#include <tbb/task_arena.h>

#include "conflux/convert.h"
#include "conflux/kernels.h"
#include "conflux/plugin_context.h"

namespace conflux {

namespace fs = std::filesystem;

namespace {

std::string shape_text(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::uint64_t element_bytes(DType t) { return static_cast<std::uint64_t>(dtype_bits(t) / 8); }

// Elements one task processes in a row (chunk by chunk): its output is staged and written with
// one call (every write is a system call), about 2 MiB of bf16, while chunks stay small enough
// for the cache. With simple_partitioner a range is split down to this grain the same way at any
// thread count, so reductions keep their fixed tree.
constexpr std::uint64_t kTaskElements = std::uint64_t{1} << 20;

// Bytes per read and write of a tensor copied unchanged.
constexpr std::uint64_t kCopyBlock = std::uint64_t{1} << 20;

std::uint64_t chunks_per_task(std::uint64_t chunk_elements) {
  return std::max<std::uint64_t>(1, kTaskElements / std::max<std::uint64_t>(1, chunk_elements));
}

// 64-byte aligned, zero-initialised float/byte storage that survives moves; its first
// `uninitialised` bytes are left as allocated (a partial's bytes that its plugin initialises
// itself: writing them would fault in pages that a sparse reduce never uses).
struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using AlignedPtr = std::unique_ptr<T[], AlignedFree>;

template <class T>
AlignedPtr<T> aligned_array(std::size_t n, std::size_t uninitialised = 0) {
  const std::size_t bytes = std::max<std::size_t>(64, (n * sizeof(T) + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  const std::size_t from = std::min(uninitialised, bytes);
  std::memset(static_cast<std::byte*>(p) + from, 0, bytes - from);
  return AlignedPtr<T>(static_cast<T*>(p));
}

// CONFLUX_POISON_STATS=1: the partials' bytes that plugins initialise themselves are filled with
// 0xA5 (cfx_pass.instance_stats_unzeroed), for the plugins' tests.
bool poison_stats() {
  static const bool yes = [] {
    const char* v = std::getenv("CONFLUX_POISON_STATS");
    return v && std::strcmp(v, "1") == 0;
  }();
  return yes;
}

// Reduce partials of one size, recycled: a partial can be a MiB (a radix histogram per model),
// a reduce makes one per leaf task, and a fresh allocation that large is a fresh mapping whose
// pages fault in as they are first written. New and recycled ones alike are zeroed past the
// `unzeroed` bytes the plugin initialises itself (cfx_pass.instance_stats_unzeroed), which
// `poison` fills with 0xA5 instead (a new one's are left untouched otherwise: a histogram's
// pages a sparse reduce never uses are never faulted in).
class PartialPool {
 public:
  PartialPool(std::size_t bytes, std::size_t unzeroed, bool poison)
      : bytes_(bytes), unzeroed_(unzeroed), poison_(poison) {}

  // A zero-filled partial that goes back to the pool when the lease ends.
  class Lease {
   public:
    Lease() = default;
    Lease(PartialPool* pool, AlignedPtr<std::byte> p) : pool_(pool), p_(std::move(p)) {}
    Lease(Lease&& o) noexcept = default;
    Lease& operator=(Lease&& o) noexcept {
      reset();
      pool_ = o.pool_;
      p_ = std::move(o.p_);
      return *this;
    }
    ~Lease() { reset(); }
    std::byte* get() const { return p_.get(); }
    void reset() {
      if (p_) pool_->give(std::move(p_));
    }

   private:
    PartialPool* pool_ = nullptr;
    AlignedPtr<std::byte> p_;
  };

  Lease take() {
    AlignedPtr<std::byte> p;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!free_.empty()) {
        p = std::move(free_.back());
        free_.pop_back();
      }
    }
    if (p) std::memset(p.get() + unzeroed_, 0, bytes_ - unzeroed_);
    else p = aligned_array<std::byte>(bytes_, unzeroed_);
    if (poison_) std::memset(p.get(), 0xA5, unzeroed_);
    return Lease(this, std::move(p));
  }

 private:
  void give(AlignedPtr<std::byte> p) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(std::move(p));
  }

  std::size_t bytes_, unzeroed_;
  bool poison_;
  std::mutex mutex_;
  std::vector<AlignedPtr<std::byte>> free_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Plan
// ---------------------------------------------------------------------------------------------

MergePlan MergePlan::open(const std::optional<fs::path>& base, bool use_base, const std::vector<fs::path>& models,
                          std::optional<DType> out_dtype) {
  MergePlan plan;
  if (base && use_base) plan.base_ = Checkpoint::open(*base);
  plan.models_.reserve(models.size());
  for (const auto& m : models) plan.models_.push_back(Checkpoint::open(m));
  if (plan.models_.empty()) throw MergeError("no models to merge");

  // The reference fixes the tensor list and order: the base when used, else the first model.
  const Checkpoint& ref = plan.base_ ? *plan.base_ : plan.models_.front();
  const std::string ref_label = plan.base_ ? "the base " + ref.path().string() : "model " + ref.path().string();
  auto check_same_set = [&](const Checkpoint& c) {
    for (const TensorRef& t : c.tensors())
      if (!ref.find(t.name()))
        throw MergeError("tensor '" + t.name() + "' of model " + c.path().string() + " is not in " + ref_label);
  };
  for (const Checkpoint& m : plan.models_) check_same_set(m);

  for (const TensorRef& r : ref.tensors()) {
    PlannedItem item;
    item.name = r.name();
    item.shape = r.info->shape;
    item.numel = r.info->numel;
    item.in_dtype = r.info->dtype;
    item.merged = dtype_is_mergeable(r.info->dtype);
    item.out_dtype = item.merged && out_dtype ? *out_dtype : item.in_dtype;
    if (plan.base_) item.base = &r;
    for (const Checkpoint& m : plan.models_) {
      const TensorRef* t = m.find(item.name);
      if (!t) throw MergeError("tensor '" + item.name + "' is missing from model " + m.path().string() + " (present in " + ref_label + ")");
      if (t->info->shape != item.shape)
        throw MergeError("tensor '" + item.name + "' has shape " + shape_text(t->info->shape) + " in model " +
                         m.path().string() + " but " + shape_text(item.shape) + " in " + ref_label);
      if (t->info->dtype != item.in_dtype)
        throw MergeError("tensor '" + item.name + "' has dtype " + std::string(dtype_name(t->info->dtype)) +
                         " in model " + m.path().string() + " but " + std::string(dtype_name(item.in_dtype)) +
                         " in " + ref_label);
      item.models.push_back(t);
    }
    const std::uint64_t inputs = item.merged ? plan.models_.size() + (plan.base_ ? 1 : 0) : 1;
    plan.input_bytes_ += inputs * r.info->nbytes();
    plan.output_bytes_ += item.numel * element_bytes(item.out_dtype);
    plan.items_.push_back(std::move(item));
  }
  return plan;
}

std::vector<OutputTensor> MergePlan::output_tensors() const {
  std::vector<OutputTensor> out;
  out.reserve(items_.size());
  for (const auto& i : items_) out.push_back({i.name, i.out_dtype, i.shape});
  return out;
}

// ---------------------------------------------------------------------------------------------
// Execution
// ---------------------------------------------------------------------------------------------

namespace {

// Per-thread buffers: one chunk's inputs as float32 and its output, and the output bytes of a
// whole task (written with one call: every write is a system call).
struct Scratch {
  std::size_t capacity = 0;
  AlignedPtr<float> base;
  std::vector<AlignedPtr<float>> models;
  std::vector<const float*> model_ptrs;
  std::vector<const std::uint16_t*> bf16_ptrs;  // CFX_PASS_BF16_INPUTS: into the raw copies
  std::size_t out_capacity = 0;
  AlignedPtr<float> out;
  std::size_t staging_capacity = 0;
  AlignedPtr<std::byte> staging;

  std::byte* ensure_staging(std::size_t bytes) {
    if (staging_capacity < bytes) {
      staging = aligned_array<std::byte>(bytes);
      staging_capacity = bytes;
    }
    return staging.get();
  }

  void ensure(std::size_t n, std::size_t model_count) {
    if (capacity >= n && models.size() == model_count) return;
    capacity = std::max(n, capacity);
    base = aligned_array<float>(capacity);
    models.clear();
    model_ptrs.clear();
    for (std::size_t i = 0; i < model_count; ++i) {
      models.push_back(aligned_array<float>(capacity));
      model_ptrs.push_back(models.back().get());
    }
  }

  // The stored bytes of a chunk of input `slot` (0: the base, 1 + i: model i), read from the
  // page cache (SafetensorsFile::read).
  std::vector<AlignedPtr<std::byte>> raw;
  std::vector<std::size_t> raw_capacity;
  std::byte* ensure_raw(std::size_t slot, std::size_t bytes) {
    if (raw.size() <= slot) {
      raw.resize(slot + 1);
      raw_capacity.resize(slot + 1, 0);
    }
    if (raw_capacity[slot] < bytes) {
      raw[slot] = aligned_array<std::byte>(bytes);
      raw_capacity[slot] = bytes;
    }
    return raw[slot].get();
  }
  // Reads bytes [b0, b1) of a tensor's data into input slot `slot`'s buffer: how the engine reads
  // (SafetensorsFile::read, from the page cache).
  std::byte* read(std::size_t slot, const Checkpoint& c, const TensorRef& ref, std::uint64_t b0, std::uint64_t b1) {
    std::byte* dst = ensure_raw(slot, static_cast<std::size_t>(b1 - b0));
    c.shards()[ref.shard].read(ref.info->begin + b0, ref.info->begin + b1, dst);
    return dst;
  }

  float* ensure_out(std::size_t n) {
    if (out_capacity < n) {
      out = aligned_array<float>(n);
      out_capacity = n;
    }
    return out.get();
  }
};

class Runner {
 public:
  Runner(const MergePlan& plan, const LoadedPlugin& plugin, const ParamSet& params, CheckpointWriter& out,
         const EngineOptions& options)
      : plan_(plan), plugin_(plugin), params_(params), out_(out), opt_(options) {
    for (std::size_t i = 0; i < plan.items().size(); ++i)
      if (plan.items()[i].merged) merged_.push_back(i);
    tensors_.resize(merged_.size());
    for (std::size_t k = 0; k < merged_.size(); ++k) {
      const PlannedItem& item = plan.items()[merged_[k]];
      cfx_tensor& t = tensors_[k];
      t.struct_size = sizeof t;
      t.rank = static_cast<std::uint32_t>(item.shape.size());
      t.index = k;
      t.name = item.name.c_str();
      t.shape = item.shape.data();
      t.numel = item.numel;
      t.row_length = item.shape.empty() ? item.numel : item.shape.back();
      t.in_precision = static_cast<std::uint32_t>(dtype_significand_bits(item.in_dtype));
      t.out_precision = static_cast<std::uint32_t>(dtype_significand_bits(item.out_dtype));
    }
    names_ = opt_.model_names;
    for (std::size_t i = names_.size(); i < plan.models().size(); ++i) names_.push_back(plan.models()[i].path().string());
    for (const auto& n : names_) name_ptrs_.push_back(n.c_str());
    ctx_.job = opt_.job_name;
    ctx_.strategy = plugin.id();
  }

  ~Runner() {
    if (instance_) plugin_.desc.destroy(instance_);
  }

  MergeResult run() {
    const auto start = std::chrono::steady_clock::now();
    create();
    const auto& passes = plugin_.passes;
    if (opt_.progress) {
      const auto active = static_cast<unsigned>(std::count(enabled_.begin(), enabled_.end(), true));
      opt_.progress->pass_count = active;
      opt_.progress->bytes_total = merged_input_bytes() * active + copied_bytes();
    }
    std::size_t p = 0;
    while (p < passes.size()) {
      if (passes[p].kind == CFX_PASS_MODEL_REDUCE) {
        if (enabled_[p]) timed(p, [&] { model_reduce(p); });
        ++p;
        continue;
      }
      // A run of tensor-scope passes ending in the map runs tensor by tensor.
      const std::size_t first = p;
      while (passes[p].kind != CFX_PASS_MAP) ++p;
      std::size_t shown = first;  // the stage's first pass that runs (the map always does)
      while (!enabled_[shown]) ++shown;
      timed(shown, [&] { tensor_stage(first, p); });
      ++p;
    }
    if (plugin_.desc.finish && plugin_.desc.finish(instance_) != 0) throw plugin_failure("finish", nullptr);
    result_.report = ctx_.report;
    result_.tensors = plan_.items().size();
    result_.merged_tensors = merged_.size();
    result_.copied_tensors = plan_.items().size() - merged_.size();
    result_.bytes_read = bytes_read_.load();
    result_.bytes_written = bytes_written_.load();
    result_.speculated_tensors = speculated_.load();
    result_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return result_;
  }

 private:
  void create() {
    job_.struct_size = sizeof job_;
    job_.model_count = static_cast<std::uint32_t>(plan_.models().size());
    job_.host = host_table();
    job_.ctx = &ctx_;
    job_.has_base = plan_.base() ? 1 : 0;
    job_.param_count = static_cast<std::uint32_t>(params_.values().size());
    job_.params = params_.values().data();
    job_.seed = opt_.seed;
    job_.tensor_count = tensors_.size();
    job_.tensors = tensors_.data();
    job_.model_names = name_ptrs_.data();
    if (plugin_.desc.create(&job_, &instance_) != 0 || !instance_) {
      instance_ = nullptr;
      throw plugin_failure("create", nullptr);
    }
    for (const cfx_pass& pass : plugin_.passes) {
      enabled_.push_back(!pass.enabled || pass.enabled(instance_) != 0);
      // The partials of a reduce pass that runs (a map's, or a disabled pass's, are never used).
      const bool reduce = pass.kind != CFX_PASS_MAP && enabled_.back();
      std::uint64_t size = 0, unzeroed = 0;
      if (reduce) {
        size = pass.instance_stats_size ? pass.instance_stats_size(instance_) : pass.stats_size;
        if (size == 0 || size > (std::uint64_t{1} << 30))
          throw MergeError("strategy '" + plugin_.id() + "' declares reduce statistics of " + std::to_string(size) +
                           " bytes (must be 1 byte to 1 GiB)");
        if (pass.instance_stats_unzeroed) unzeroed = pass.instance_stats_unzeroed(instance_);
        if (unzeroed > size || unzeroed % 16 != 0)
          throw MergeError("strategy '" + plugin_.id() + "' leaves " + std::to_string(unzeroed) +
                           " bytes of its reduce statistics of " + std::to_string(size) +
                           " bytes unzeroed (must be a multiple of 16, at most the size)");
      }
      pools_.push_back(std::make_unique<PartialPool>(static_cast<std::size_t>(size), static_cast<std::size_t>(unzeroed),
                                                     poison_stats()));
    }
    for (const cfx_pass& pass : plugin_.passes)
      if ((pass.flags & (CFX_PASS_TASK_VECTORS | CFX_PASS_OUTPUT_DELTA)) && !plan_.base())
        throw MergeError("strategy '" + plugin_.id() + "' computes task vectors, which need a base model");
  }

  MergeError plugin_failure(const char* what, const cfx_tensor* t) const {
    std::string m = "strategy '" + plugin_.id() + "' failed in " + what;
    if (t) m += " on tensor '" + std::string(t->name) + "'";
    m += ": " + (ctx_.failed() ? ctx_.failure() : std::string("no reason given"));
    return MergeError(m);
  }

  template <class F>
  void timed(std::size_t pass, F&& f) {
    if (opt_.progress)
      opt_.progress->pass = static_cast<unsigned>(std::count(enabled_.begin(), enabled_.begin() + static_cast<std::ptrdiff_t>(pass) + 1, true));
    const auto t0 = std::chrono::steady_clock::now();
    arena().execute(f);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    static constexpr const char* kKinds[] = {"", "map", "tensor_reduce", "model_reduce"};
    result_.passes.push_back({kKinds[plugin_.passes[pass].kind], s});
  }

  tbb::task_arena& arena() {
    if (!arena_) {
      const int n = opt_.threads == 0 ? tbb::this_task_arena::max_concurrency() : static_cast<int>(opt_.threads);
      arena_ = std::make_unique<tbb::task_arena>(n);
    }
    return *arena_;
  }

  void check_cancel() const {
    if (opt_.cancel && opt_.cancel->load(std::memory_order_relaxed)) throw MergeError("cancelled");
  }

  std::uint64_t merged_input_bytes() const {
    std::uint64_t n = 0;
    const std::uint64_t inputs = plan_.models().size() + (plan_.base() ? 1 : 0);
    for (std::size_t i : merged_) n += inputs * plan_.items()[i].numel * element_bytes(plan_.items()[i].in_dtype);
    return n;
  }
  std::uint64_t copied_bytes() const {
    std::uint64_t n = 0;
    for (const auto& item : plan_.items())
      if (!item.merged) n += item.numel * element_bytes(item.in_dtype);
    return n;
  }

  // Chunks of a tensor for a pass: fixed size, or whole rows.
  std::uint64_t chunk_size(const cfx_tensor& t, const cfx_pass& pass) const {
    std::uint64_t c = std::max<std::uint64_t>(1, opt_.chunk_elements);
    if ((pass.flags & CFX_PASS_WHOLE_ROWS) && t.row_length > 0) c = std::max<std::uint64_t>(1, c / t.row_length) * t.row_length;
    return c;
  }

  // Reads the chunk's inputs into per-thread copies (SafetensorsFile::read: pread from the page
  // cache, nothing mapped) and converts them to float32, or points at the stored BF16 values in
  // the copies (CFX_PASS_BF16_INPUTS; the copies are aligned whatever the file's offsets).
  // Copies, not mapped pages: faulting pages in and releasing them again (page-table updates,
  // TLB shootdowns) is the costlier way to read a model once, several times costlier in VMs
  // whose page faults exit to the hypervisor; the copy stays in cache for the plugin, and page
  // cache pages read this way never count in the process's RSS.
  void load(const PlannedItem& item, std::uint64_t begin, std::uint64_t count, const cfx_pass& pass, Scratch& s,
            cfx_chunk& chunk, const cfx_tensor& t) {
    const std::size_t n_models = plan_.models().size();
    const std::uint64_t esize = element_bytes(item.in_dtype);
    const std::uint64_t b0 = begin * esize, b1 = (begin + count) * esize;
    chunk.struct_size = sizeof chunk;
    chunk.model_count = static_cast<std::uint32_t>(n_models);
    chunk.tensor = &t;
    chunk.begin = begin;
    chunk.count = count;
    bytes_read_ += (n_models + (plan_.base() ? 1 : 0)) * (b1 - b0);
    if (opt_.progress) opt_.progress->bytes_done += (n_models + (plan_.base() ? 1 : 0)) * (b1 - b0);
    // The stored bytes of input `slot` (0: the base, 1 + i: model i).
    auto bytes = [&](const Checkpoint& c, const TensorRef& ref, std::size_t slot) -> const std::byte* {
      return s.read(slot, c, ref, b0, b1);
    };
    if ((pass.flags & CFX_PASS_BF16_INPUTS) && item.in_dtype == DType::BF16) {
      auto at = [&](const Checkpoint& c, const TensorRef& ref, std::size_t slot) {
        return reinterpret_cast<const std::uint16_t*>(bytes(c, ref, slot));
      };
      s.bf16_ptrs.resize(n_models);
      for (std::size_t i = 0; i < n_models; ++i) s.bf16_ptrs[i] = at(plan_.models()[i], *item.models[i], 1 + i);
      chunk.bf16_models = s.bf16_ptrs.data();
      chunk.bf16_base = plan_.base() ? at(*plan_.base(), *item.base, 0) : nullptr;
      return;
    }
    s.ensure(static_cast<std::size_t>(count), n_models);
    const float* base = nullptr;
    if (plan_.base()) {
      to_f32(item.in_dtype, bytes(*plan_.base(), *item.base, 0), s.base.get(), static_cast<std::size_t>(count));
      base = s.base.get();
    }
    for (std::size_t i = 0; i < n_models; ++i) {
      const std::byte* x = bytes(plan_.models()[i], *item.models[i], 1 + i);
      if (pass.flags & CFX_PASS_TASK_VECTORS) to_f32_minus(item.in_dtype, x, base, s.models[i].get(), static_cast<std::size_t>(count));
      else to_f32(item.in_dtype, x, s.models[i].get(), static_cast<std::size_t>(count));
    }
    chunk.models = s.model_ptrs.data();
    chunk.base = base;
  }

  // Deterministic per-tensor reduction over the tensor's chunks.
  class ReduceBody {
   public:
    // speculate: hand each chunk room for its output (CFX_PASS_SPECULATIVE_OUTPUT) and write
    // what the plugin fills.
    ReduceBody(Runner& r, std::size_t pass, std::size_t k, bool speculate)
        : r_(r), pass_(pass), k_(k), speculate_(speculate), partial_(r.pools_[pass]->take()) {}
    ReduceBody(ReduceBody& other, tbb::split) : ReduceBody(other.r_, other.pass_, other.k_, other.speculate_) {}
    void operator()(const tbb::blocked_range<std::uint64_t>& range) {
      const cfx_pass& pass = r_.plugin_.passes[pass_];
      const cfx_tensor& t = r_.tensors_[k_];
      const std::size_t item_index = r_.merged_[k_];
      const PlannedItem& item = r_.plan_.items()[item_index];
      const std::uint64_t size = r_.chunk_size(t, pass);
      Scratch& s = r_.scratch_.local();
      const std::uint64_t out_esize = element_bytes(item.out_dtype);
      const std::uint64_t first = range.begin() * size;
      std::byte* staged =
          speculate_ ? s.ensure_staging(static_cast<std::size_t>((std::min(range.end() * size, t.numel) - first) * out_esize))
                     : nullptr;
      std::uint64_t run = first, run_end = first;  // filled outputs staged but not written yet
      auto flush = [&] {
        if (run_end == run) return;
        r_.out_.write_at(item_index, run * out_esize, {staged + (run - first) * out_esize, (run_end - run) * out_esize});
        r_.bytes_written_ += (run_end - run) * out_esize;
      };
      for (std::uint64_t c = range.begin(); c != range.end(); ++c) {
        r_.check_cancel();
        const std::uint64_t begin = c * size, count = std::min(size, t.numel - begin);
        cfx_chunk chunk{};
        r_.load(item, begin, count, pass, s, chunk, t);
        std::uint32_t written = 0;
        if (speculate_) {
          chunk.out = s.ensure_out(static_cast<std::size_t>(count));
          chunk.out_written = &written;
        }
        if (pass.reduce(r_.instance_, &chunk, partial_.get()) != 0) throw r_.plugin_failure("reduce", &t);
        if (!written) continue;
        ++filled_;
        from_f32(item.out_dtype, chunk.out, staged + (begin - first) * out_esize, static_cast<std::size_t>(count));
        if (begin != run_end) {
          flush();
          run = begin;
        }
        run_end = begin + count;
      }
      flush();
    }
    void join(ReduceBody& rhs) {
      const cfx_tensor* t = &r_.tensors_[k_];
      if (r_.plugin_.passes[pass_].combine(r_.instance_, t, partial_.get(), rhs.partial_.get()) != 0)
        throw r_.plugin_failure("combine", t);
      filled_ += rhs.filled_;
    }
    PartialPool::Lease take_partial() { return std::move(partial_); }
    std::uint64_t filled() const { return filled_; }  // chunks whose output the plugin wrote

   private:
    Runner& r_;
    std::size_t pass_, k_;
    bool speculate_;
    PartialPool::Lease partial_;
    std::uint64_t filled_ = 0;
  };

  std::uint64_t chunk_count(const cfx_tensor& t, const cfx_pass& pass) const {
    const std::uint64_t size = chunk_size(t, pass);
    return (t.numel + size - 1) / size;
  }

  // filled (speculate): how many chunks wrote their output.
  PartialPool::Lease reduce_tensor(std::size_t pass, std::size_t k, bool speculate = false,
                                   std::uint64_t* filled = nullptr) {
    const cfx_tensor& t = tensors_[k];
    ReduceBody body(*this, pass, k, speculate);
    const std::uint64_t chunks = chunk_count(t, plugin_.passes[pass]);
    if (chunks > 0)
      tbb::parallel_deterministic_reduce(tbb::blocked_range<std::uint64_t>(0, chunks, chunks_per_task(chunk_size(t, plugin_.passes[pass]))), body,
                                         tbb::simple_partitioner());
    if (filled) *filled = body.filled();
    return body.take_partial();
  }

  void model_reduce(std::size_t pass) {
    const cfx_pass& p = plugin_.passes[pass];
    PartialPool::Lease total = pools_[pass]->take();
    // Tensors are reduced a batch at a time (in parallel) and folded into the total in tensor
    // order: deterministic, and only a batch of partials is alive, whatever their size.
    constexpr std::size_t kBatch = 8;
    std::vector<PartialPool::Lease> partials(kBatch);
    for (std::size_t first = 0; first < tensors_.size(); first += kBatch) {
      const std::size_t n = std::min(kBatch, tensors_.size() - first);
      tbb::parallel_for(std::size_t{0}, n, [&](std::size_t j) { partials[j] = reduce_tensor(pass, first + j); });
      for (std::size_t j = 0; j < n; ++j) {
        if (p.combine(instance_, nullptr, total.get(), partials[j].get()) != 0) throw plugin_failure("combine", nullptr);
        partials[j].reset();
      }
    }
    std::int32_t repeat = 0;
    if (p.reduce_done(instance_, nullptr, total.get(), &repeat) != 0) throw plugin_failure("reduce_done", nullptr);
  }

  void tensor_stage(std::size_t first, std::size_t map_pass) {
    const std::size_t n_items = plan_.items().size();
    tbb::parallel_for(std::size_t{0}, n_items, [&](std::size_t i) {
      const PlannedItem& item = plan_.items()[i];
      if (!item.merged) return copy_tensor(i);
      const std::size_t k = static_cast<std::size_t>(std::lower_bound(merged_.begin(), merged_.end(), i) - merged_.begin());
      const cfx_tensor& t = tensors_[k];
      for (std::size_t p = first; p < map_pass; ++p) {
        if (!enabled_[p]) continue;
        const bool speculative = opt_.speculative_output && (plugin_.passes[p].flags & CFX_PASS_SPECULATIVE_OUTPUT) != 0;
        for (int round = 0;; ++round) {
          if (round > 64) throw MergeError("strategy '" + plugin_.id() + "' repeated a pass more than 64 times on tensor '" + item.name + "'");
          std::uint64_t filled = 0;
          auto stats = reduce_tensor(p, k, speculative && round == 0, &filled);
          std::int32_t repeat = 0;
          if (plugin_.passes[p].reduce_done(instance_, &t, stats.get(), &repeat) != 0)
            throw plugin_failure("reduce_done", &t);
          if (repeat == CFX_REDUCE_OUTPUT_FINAL) {
            const std::string declared =
                "strategy '" + plugin_.id() + "' declared its output of tensor '" + item.name + "' final, but ";
            if (!speculative || round != 0) throw MergeError(declared + "the pass cannot write output here");
            const std::uint64_t chunks = chunk_count(t, plugin_.passes[p]);
            if (filled != chunks)
              throw MergeError(declared + "only " + std::to_string(filled) + " of its " + std::to_string(chunks) +
                               " chunks wrote output");
            ++speculated_;
            return;  // the remaining passes of this tensor are skipped
          }
          if (!repeat) break;
        }
      }
      map_tensor(map_pass, i, k);
    });
  }

  void map_tensor(std::size_t pass, std::size_t item_index, std::size_t k) {
    const cfx_pass& p = plugin_.passes[pass];
    const cfx_tensor& t = tensors_[k];
    const PlannedItem& item = plan_.items()[item_index];
    const std::uint64_t size = chunk_size(t, p), chunks = chunk_count(t, p);
    const std::uint64_t out_esize = element_bytes(item.out_dtype);
    tbb::parallel_for(tbb::blocked_range<std::uint64_t>(0, chunks, chunks_per_task(size)), [&](const tbb::blocked_range<std::uint64_t>& r) {
      Scratch& s = scratch_.local();
      const std::uint64_t first = r.begin() * size, last = std::min(r.end() * size, t.numel);
      std::byte* staged = s.ensure_staging(static_cast<std::size_t>((last - first) * out_esize));
      for (std::uint64_t c = r.begin(); c != r.end(); ++c) {
        check_cancel();
        const std::uint64_t begin = c * size, count = std::min(size, t.numel - begin);
        cfx_chunk chunk{};
        load(item, begin, count, p, s, chunk, t);
        float* out = s.ensure_out(static_cast<std::size_t>(count));
        if (p.map(instance_, &chunk, out) != 0) throw plugin_failure("map", &t);
        if (p.flags & CFX_PASS_OUTPUT_DELTA) add_f32(out, chunk.base, static_cast<std::size_t>(count));
        from_f32(item.out_dtype, out, staged + (begin - first) * out_esize, static_cast<std::size_t>(count));
      }
      out_.write_at(item_index, first * out_esize, {staged, (last - first) * out_esize});
      bytes_written_ += (last - first) * out_esize;
    }, tbb::simple_partitioner());
  }

  // A non-floating tensor goes to the output unchanged, from the reference input, through a
  // per-thread copy (as load reads).
  void copy_tensor(std::size_t item_index) {
    const PlannedItem& item = plan_.items()[item_index];
    const Checkpoint& c = plan_.base() ? *plan_.base() : plan_.models().front();
    const TensorRef& ref = item.base ? *item.base : *item.models.front();
    const std::uint64_t bytes = ref.info->nbytes();
    Scratch& s = scratch_.local();
    for (std::uint64_t off = 0; off < bytes; off += kCopyBlock) {
      check_cancel();
      const std::uint64_t n = std::min(kCopyBlock, bytes - off);
      out_.write_at(item_index, off, {s.read(0, c, ref, off, off + n), n});
      bytes_read_ += n;
      bytes_written_ += n;
      if (opt_.progress) opt_.progress->bytes_done += n;
    }
  }

  const MergePlan& plan_;
  const LoadedPlugin& plugin_;
  const ParamSet& params_;
  CheckpointWriter& out_;
  const EngineOptions& opt_;

  std::vector<std::size_t> merged_;  // item indices of the floating tensors, ascending
  std::vector<cfx_tensor> tensors_;  // one per merged item
  std::vector<std::string> names_;
  std::vector<const char*> name_ptrs_;
  cfx_context ctx_;
  cfx_job job_{};
  void* instance_ = nullptr;
  std::vector<std::unique_ptr<PartialPool>> pools_;  // per pass
  std::vector<bool> enabled_;  // per pass, as the plugin decided for this job
  std::unique_ptr<tbb::task_arena> arena_;
  tbb::enumerable_thread_specific<Scratch> scratch_;
  std::atomic<std::uint64_t> bytes_read_{0}, bytes_written_{0};
  std::atomic<std::uint64_t> speculated_{0};  // tensors finished by a speculative reduce
  MergeResult result_;
};

}  // namespace

MergeResult run_merge(const MergePlan& plan, const LoadedPlugin& plugin, const ParamSet& params, CheckpointWriter& out,
                      const EngineOptions& options) {
  Runner runner(plan, plugin, params, out, options);
  return runner.run();
}

MergeResult run_floor(const MergePlan& plan, CheckpointWriter& out, const EngineOptions& options, unsigned input_reads) {
  const auto start = std::chrono::steady_clock::now();
  std::atomic<std::uint64_t> read{0}, written{0}, sink{0};
  const int threads = options.threads == 0 ? tbb::this_task_arena::max_concurrency() : static_cast<int>(options.threads);
  tbb::task_arena arena(threads);
  tbb::enumerable_thread_specific<Scratch> scratch;
  const std::size_t n_models = plan.models().size();
  const std::uint64_t size = std::max<std::uint64_t>(1, options.chunk_elements);

  // Reads a range as the engine does (Scratch::read) and touches each cache line of the copy
  // once, as a strategy reads its inputs.
  auto copy = [&](Scratch& s, std::size_t slot, const Checkpoint& ck, const TensorRef& ref, std::uint64_t b0,
                  std::uint64_t b1) {
    std::byte* dst = s.read(slot, ck, ref, b0, b1);
    std::uint64_t acc = 0;
    for (std::uint64_t b = 0; b < b1 - b0; b += 64) acc += static_cast<std::uint64_t>(dst[b]);
    sink.fetch_add(acc, std::memory_order_relaxed);
    read += b1 - b0;
    return dst;
  };

  arena.execute([&] {
    // Extra read-only passes (strategies with a model-scope statistics pass).
    for (unsigned pass = 1; pass < input_reads; ++pass)
      tbb::parallel_for(std::size_t{0}, plan.items().size(), [&](std::size_t i) {
        const PlannedItem& item = plan.items()[i];
        if (!item.merged) return;
        const std::uint64_t chunks = (item.numel + size - 1) / size, e = element_bytes(item.in_dtype);
        tbb::parallel_for(tbb::blocked_range<std::uint64_t>(0, chunks, chunks_per_task(size)), [&](const tbb::blocked_range<std::uint64_t>& r) {
          Scratch& s = scratch.local();
          for (std::uint64_t c = r.begin(); c != r.end(); ++c) {
            const std::uint64_t b0 = c * size * e, b1 = std::min(item.numel, (c + 1) * size) * e;
            if (plan.base()) copy(s, 0, *plan.base(), *item.base, b0, b1);
            for (std::size_t m = 0; m < n_models; ++m) copy(s, 1 + m, plan.models()[m], *item.models[m], b0, b1);
          }
        }, tbb::simple_partitioner());
      });
    // The final pass: read everything, write the output (staged per task, as the engine does).
    tbb::parallel_for(std::size_t{0}, plan.items().size(), [&](std::size_t i) {
      const PlannedItem& item = plan.items()[i];
      const std::uint64_t chunks = (item.numel + size - 1) / size;
      const std::uint64_t in_esize = element_bytes(item.in_dtype), out_esize = element_bytes(item.out_dtype);
      tbb::parallel_for(tbb::blocked_range<std::uint64_t>(0, chunks, chunks_per_task(size)), [&](const tbb::blocked_range<std::uint64_t>& r) {
        Scratch& s = scratch.local();
        s.ensure_out(static_cast<std::size_t>(size));
        const std::uint64_t first = r.begin() * size, last = std::min(r.end() * size, item.numel);
        if (!item.merged) {
          const Checkpoint& ck = plan.base() ? *plan.base() : plan.models().front();
          const TensorRef& ref = item.base ? *item.base : *item.models.front();
          const std::uint64_t b0 = first * in_esize, b1 = last * in_esize;
          out.write_at(i, b0, {copy(s, 0, ck, ref, b0, b1), b1 - b0});
          written += b1 - b0;
          return;
        }
        std::byte* staged = s.ensure_staging(static_cast<std::size_t>((last - first) * out_esize));
        for (std::uint64_t c = r.begin(); c != r.end(); ++c) {
          const std::uint64_t begin = c * size, count = std::min(size, item.numel - begin);
          const std::uint64_t b0 = begin * in_esize, b1 = (begin + count) * in_esize;
          if (plan.base()) copy(s, 0, *plan.base(), *item.base, b0, b1);
          for (std::size_t m = 1; m < n_models; ++m) copy(s, 1 + m, plan.models()[m], *item.models[m], b0, b1);
          // The first model is converted and written: the write path of a merge.
          const std::byte* x = copy(s, 1, plan.models().front(), *item.models.front(), b0, b1);
          to_f32(item.in_dtype, x, s.out.get(), static_cast<std::size_t>(count));
          from_f32(item.out_dtype, s.out.get(), staged + (begin - first) * out_esize, static_cast<std::size_t>(count));
        }
        out.write_at(i, first * out_esize, {staged, (last - first) * out_esize});
        written += (last - first) * out_esize;
      }, tbb::simple_partitioner());
    });
  });
  MergeResult r;
  r.tensors = plan.items().size();
  r.bytes_read = read;
  r.bytes_written = written;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

}  // namespace conflux
