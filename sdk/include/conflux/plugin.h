/*
 * Conflux strategy plugin ABI — the one stable binary interface between the Conflux host
 * (conflux, confluxd) and a merge strategy shipped as a shared object.
 *
 * Compiles as C11 and as C++17/20. No SIMD types, no C++ types, no exceptions cross it.
 *
 * HOW A PLUGIN IS FOUND AND LOADED
 *   The host dlopen()s every "*.so" in its plugin directories and looks up one symbol,
 *   CFX_PLUGIN_ENTRY_SYMBOL ("conflux_plugin_entry"), of type cfx_plugin_entry_fn. It calls it
 *   once with the host's function table and receives the plugin's descriptor. A plugin whose
 *   descriptor's abi_major differs from the host's CFX_ABI_MAJOR is refused with a message; a
 *   plugin built against an older minor version is accepted (structs it does not know end
 *   earlier: the host reads `struct_size` and treats missing trailing fields as zero).
 *
 * VERSIONING RULES (what keeps old plugins working)
 *   - Every struct starts with `uint32_t struct_size`, set by whoever fills it in.
 *   - Structs only grow at the end; a field is never removed, reordered or retyped.
 *   - The host table (cfx_host) is append-only; a plugin needing a newer entry checks
 *     `host->struct_size` (CFX_HOST_HAS) before calling it.
 *   - Adding a field or host function bumps CFX_ABI_MINOR; anything else bumps CFX_ABI_MAJOR.
 *
 * THE MERGE MODEL
 *   A job gives the plugin N models (and, if it declares one, a base). The host streams every
 *   floating-point tensor through the plugin's passes, in the order the plugin declares them:
 *     - CFX_PASS_MAP:           for each chunk, the plugin writes the output values.
 *     - CFX_PASS_TENSOR_REDUCE: for each chunk, the plugin folds statistics into a partial
 *                               (host-allocated, zeroed, `stats_size` bytes; ABI 1.4: a
 *                               leading part may be left for the plugin to initialise, see
 *                               instance_stats_unzeroed); the host combines
 *                               partials in a fixed tree order independent of thread count, then
 *                               calls `reduce_done` with the tensor's statistics. The plugin may
 *                               ask to repeat the pass on that tensor (e.g. a radix select).
 *     - CFX_PASS_MODEL_REDUCE:  the same over every tensor of the model: partials are combined
 *                               per tensor, then across tensors in tensor order, and
 *                               `reduce_done` is called once with tensor == NULL.
 *   A model-scope pass runs over the whole model before the next pass starts. A run of
 *   consecutive tensor-scope passes (tensor reduces, then a map) runs tensor by tensor, so the
 *   re-reads of one tensor hit the cache. The last pass must be a map pass.
 *   Values reach the plugin as float32 (converted by the host from BF16/F16/F32/F64), optionally
 *   as task vectors d_i = theta_i - theta_base (CFX_PASS_TASK_VECTORS), or, for a pass that
 *   asks (CFX_PASS_BF16_INPUTS), BF16 tensors as stored. A map pass with
 *   CFX_PASS_OUTPUT_DELTA writes the merged delta and the host adds the base; the float32 result
 *   is rounded to the output dtype (nearest, ties to even) by the host.
 *   Non-floating tensors (integer buffers) never reach the plugin: the host copies them from the
 *   base (or the first model).
 *   Chunks: within one job, every pass with the same CFX_PASS_WHOLE_ROWS flag cuts a tensor into
 *   the same chunks (chunk j covers elements [j*size, min((j+1)*size, numel)), size fixed per
 *   tensor and flag), so a plugin may keep per-chunk results of a reduce pass (indexed by
 *   chunk->begin) for a later pass, e.g. prefix counts that make a selection exact.
 *
 * THREADING CONTRACT
 *   create/finish/destroy: called from one thread, never concurrently with anything else.
 *   reduce/map: [thread-safe] called concurrently for different chunks, of the same tensor or of
 *     different tensors; the plugin must not keep pointers into a chunk after returning.
 *   combine/reduce_done: [thread-safe across tensors] called concurrently for different tensors,
 *     never concurrently for the same tensor.
 *   Host functions are [thread-safe] unless said otherwise.
 *
 * ERRORS
 *   Every plugin callback returns 0 on success. On failure it calls host->fail(ctx, message)
 *   (the message names what is wrong) and returns non-zero; the host stops the merge, reports
 *   the message with the job and tensor, and publishes nothing.
 *
 * DETERMINISM
 *   The same inputs, parameters and seed must give bit-identical output whatever the thread
 *   count and chunking: use only the chunk's data, per-tensor state from reduce_done, and the
 *   host's counter-based random numbers (host->random_uniform), which depend only on
 *   (seed, tensor name, model index, element index).
 */
#ifndef CONFLUX_PLUGIN_H
#define CONFLUX_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CFX_ABI_MAJOR 1
#define CFX_ABI_MINOR 4

/* The one symbol a plugin exports. */
#define CFX_PLUGIN_ENTRY_SYMBOL "conflux_plugin_entry"

#if defined(__GNUC__) || defined(__clang__)
#define CFX_EXPORT __attribute__((visibility("default")))
#else
#define CFX_EXPORT
#endif

/* Opaque per-job host context; passed back to host functions. */
typedef struct cfx_context cfx_context;

/* ---------------------------------------------------------------------------------------------
 * Parameters
 * ------------------------------------------------------------------------------------------- */

typedef enum cfx_param_type {
  CFX_PARAM_FLOAT = 1,      /* double */
  CFX_PARAM_INT = 2,        /* int64 (carried in `number`, exactly) */
  CFX_PARAM_BOOL = 3,       /* 0 or 1 in `number` */
  CFX_PARAM_STRING = 4,     /* UTF-8 string; `choices` may restrict it */
  CFX_PARAM_FLOAT_LIST = 5  /* list of doubles */
} cfx_param_type;

enum cfx_param_flags {
  CFX_PARAM_HAS_MIN = 1u << 0,       /* value (each element of a list) >= min */
  CFX_PARAM_HAS_MAX = 1u << 1,       /* value <= max */
  CFX_PARAM_MIN_EXCLUSIVE = 1u << 2, /* with HAS_MIN: value > min */
  CFX_PARAM_MAX_EXCLUSIVE = 1u << 3, /* with HAS_MAX: value < max */
  CFX_PARAM_REQUIRED = 1u << 4,      /* no default: the job must set it */
  /* FLOAT_LIST only: one value per model (aligned with the job's `models`). A job may give a
     single number instead, which applies to every model; the default is `default_number` for
     every model. */
  CFX_PARAM_PER_MODEL = 1u << 5
};

typedef struct cfx_param_spec {
  uint32_t struct_size;
  uint32_t type;                /* cfx_param_type */
  uint32_t flags;               /* cfx_param_flags */
  uint32_t choice_count;        /* STRING: number of allowed values (0: any string) */
  const char* name;             /* [A-Za-z_][A-Za-z0-9_]*, unique within the plugin */
  const char* doc;              /* one line for `conflux plugins` */
  double default_number;        /* FLOAT, INT, BOOL, and PER_MODEL lists */
  const char* default_string;   /* STRING */
  double min, max;              /* see flags */
  const char* const* choices;   /* STRING: the allowed values */
} cfx_param_spec;

/* A validated parameter value, aligned with the plugin's `params` array. */
typedef struct cfx_param_value {
  uint32_t struct_size;
  uint32_t type;          /* cfx_param_type, same as the spec's */
  double number;          /* FLOAT, INT, BOOL */
  const char* string;     /* STRING (never NULL for a STRING) */
  const double* list;     /* FLOAT_LIST */
  uint64_t list_length;   /* FLOAT_LIST; for PER_MODEL lists always == model_count */
} cfx_param_value;

/* ---------------------------------------------------------------------------------------------
 * Tensors, chunks, jobs
 * ------------------------------------------------------------------------------------------- */

typedef struct cfx_tensor {
  uint32_t struct_size;
  uint32_t rank;
  uint64_t index;          /* 0 .. tensor_count-1, the order the host streams tensors in */
  const char* name;
  const uint64_t* shape;   /* rank entries */
  uint64_t numel;          /* product of shape; 1 for a scalar */
  uint64_t row_length;     /* shape[rank-1] (numel for rank 0) */
  /* ABI 1.1 (0 from a 1.0 host): significand bits, the implicit bit included, of the dtype the
     tensor is stored in (in_precision) and of the dtype its output is rounded to
     (out_precision): 8 for BF16, 11 for F16, 24 for F32, 53 for F64. They let a strategy choose
     its arithmetic: float32 carries at least 16 bits beyond a BF16 output, so a result computed
     in float32 rounds to the same BF16 value as an exact one except where it lies more than
     2^14 times below the magnitudes combined into it (cancellation); see CFX_FLOAT32_OUTPUT_BITS. */
  uint32_t in_precision;
  uint32_t out_precision;
} cfx_tensor;

/* Outputs of at most this many significand bits (BF16) may be computed in float32: Conflux's
   element-wise strategies do, recomputing in double the entries whose terms cancel; wider
   outputs (F16, F32, F64) need double to stay within 1 ulp. */
#define CFX_FLOAT32_OUTPUT_BITS 8

typedef struct cfx_chunk {
  uint32_t struct_size;
  uint32_t model_count;
  const cfx_tensor* tensor;
  uint64_t begin;               /* flat index of the chunk's first element in the tensor */
  uint64_t count;               /* elements in this chunk (> 0) */
  const float* const* models;   /* model_count arrays of `count` values (task vectors when the
                                   pass has CFX_PASS_TASK_VECTORS) */
  const float* base;            /* `count` base values, or NULL when the job has no base */
  /* ABI 1.2, passes with CFX_PASS_BF16_INPUTS: when the tensor is stored in BF16, its stored
     values instead of float32 copies. bf16_models holds model_count arrays of `count` BF16 bit
     patterns (the float32 value of a pattern p is p << 16, exactly), bf16_base the base's (NULL
     without a base), and `models` and `base` are then NULL. Otherwise (another dtype, a pass
     without the flag, or storage the host cannot hand out as aligned uint16_t) these are NULL
     and the values come as float32 as usual, so a plugin handles both forms. */
  const uint16_t* const* bf16_models;
  const uint16_t* bf16_base;
  /* ABI 1.3, the first execution on a tensor of a pass with CFX_PASS_SPECULATIVE_OUTPUT (NULL
     otherwise): room for the chunk's `count` output values (float32, 16-byte aligned, as a map
     pass's `out`). A reduce that writes all of them sets *out_written = 1; the host then writes
     them to the output, where a later map pass of the tensor overwrites them unless
     reduce_done declares them final (CFX_REDUCE_OUTPUT_FINAL). */
  float* out;
  uint32_t* out_written;
} cfx_chunk;

typedef struct cfx_host cfx_host;

typedef struct cfx_job {
  uint32_t struct_size;
  uint32_t model_count;
  const cfx_host* host;
  cfx_context* ctx;
  int32_t has_base;                    /* 1 when a base is given */
  uint32_t param_count;                /* == the plugin's param_count */
  const cfx_param_value* params;       /* aligned with the plugin's params */
  uint64_t seed;
  uint64_t tensor_count;               /* floating tensors the plugin will see */
  const cfx_tensor* tensors;           /* tensor_count entries, indexed by cfx_tensor.index */
  const char* const* model_names;      /* model_count labels (paths), for messages and reports */
} cfx_job;

/* ---------------------------------------------------------------------------------------------
 * Passes
 * ------------------------------------------------------------------------------------------- */

typedef enum cfx_pass_kind {
  CFX_PASS_MAP = 1,
  CFX_PASS_TENSOR_REDUCE = 2,
  CFX_PASS_MODEL_REDUCE = 3
} cfx_pass_kind;

enum cfx_pass_flags {
  CFX_PASS_TASK_VECTORS = 1u << 0, /* models[i] holds theta_i - theta_base (needs a base) */
  CFX_PASS_OUTPUT_DELTA = 1u << 1, /* MAP: out holds a delta; the host adds the base */
  CFX_PASS_WHOLE_ROWS = 1u << 2,   /* chunks start and end on row boundaries (row_length) */
  /* ABI 1.2: BF16 tensors may arrive as stored (cfx_chunk.bf16_models), without the host's
     conversion to float32: the plugin reads the stored values, once.
     Not combinable with TASK_VECTORS or OUTPUT_DELTA. Hosts before 1.2 refuse the flag. */
  CFX_PASS_BF16_INPUTS = 1u << 3,
  /* ABI 1.3, TENSOR_REDUCE only: in its first execution on a tensor the reduce may also compute
     the tensor's output, chunk by chunk (cfx_chunk.out), when its guess of the statistics can be
     checked once they are known (e.g. a top-k that keeps every nonzero entry of a sparse task
     vector); reduce_done then sets *repeat = CFX_REDUCE_OUTPUT_FINAL when the guess held and
     every chunk wrote its output, and the tensor is finished in one read of its inputs. The
     output must equal, bit for bit, what the later passes would have written. Not combinable
     with TASK_VECTORS or OUTPUT_DELTA. Hosts before 1.3 refuse the flag. */
  CFX_PASS_SPECULATIVE_OUTPUT = 1u << 4
};

/* reduce_done's *repeat: 0 = the statistics are complete, run the next pass; 1 = run this pass
   again on the tensor; CFX_REDUCE_OUTPUT_FINAL (ABI 1.3, passes with
   CFX_PASS_SPECULATIVE_OUTPUT, first execution only) = the output every chunk wrote in this
   execution is the tensor's output: its remaining passes are skipped. */
#define CFX_REDUCE_OUTPUT_FINAL 2

typedef struct cfx_pass {
  uint32_t struct_size;
  uint32_t kind;       /* cfx_pass_kind */
  uint32_t flags;      /* cfx_pass_flags */
  uint32_t reserved;
  uint64_t stats_size; /* REDUCE: bytes of one partial (host-allocated, zero-filled, 16-aligned;
                          see instance_stats_unzeroed) */

  /* REDUCE: fold the chunk into `partial`. */
  int (*reduce)(void* instance, const cfx_chunk* chunk, void* partial);
  /* REDUCE: fold `from` (the later elements) into `into` (the earlier ones). `tensor` is NULL
     when folding across tensors in a model-scope pass. */
  int (*combine)(void* instance, const cfx_tensor* tensor, void* into, const void* from);
  /* REDUCE: the statistics of a whole tensor (tensor scope) or of the whole model (model scope,
     tensor == NULL). Set *repeat = 1 to run this pass again on the tensor (tensor scope only),
     or CFX_REDUCE_OUTPUT_FINAL (see CFX_PASS_SPECULATIVE_OUTPUT). */
  int (*reduce_done)(void* instance, const cfx_tensor* tensor, const void* stats, int32_t* repeat);
  /* MAP: write chunk->count output values to `out` (float32, 16-byte aligned). */
  int (*map)(void* instance, const cfx_chunk* chunk, float* out);
  /* REDUCE, optional: when set, overrides stats_size for this instance (e.g. statistics sized
     by the job's model count). Called once after create(). */
  uint64_t (*instance_stats_size)(void* instance);
  /* Optional: when set and it returns 0, the host skips this pass for this job (e.g. a
     statistics pass that the job's parameters make unnecessary). Called once after create().
     The map pass cannot be skipped. */
  int32_t (*enabled)(void* instance);
  /* REDUCE, optional (ABI 1.4): when set, how many bytes at the start of each partial the host
     does not zero-fill (a multiple of 16, at most the partial's size; called once after
     create()). They hold whatever an earlier use of the memory left: the plugin initialises
     what it uses of them, and keeps track of that in the zero-filled rest. For statistics of
     which a chunk touches little, e.g. a histogram of which each chunk fills a range of bins,
     where zero-filling every partial would cost more than the reduce itself. With
     CONFLUX_POISON_STATS=1 in its environment the host fills those bytes with 0xA5 instead, so
     that a plugin's tests show any use of them before it initialises them. */
  uint64_t (*instance_stats_unzeroed)(void* instance);
} cfx_pass;

/* ---------------------------------------------------------------------------------------------
 * The plugin descriptor
 * ------------------------------------------------------------------------------------------- */

typedef enum cfx_base_use {
  CFX_BASE_UNUSED = 0,   /* a job's base, if any, is not read */
  CFX_BASE_OPTIONAL = 1,
  CFX_BASE_REQUIRED = 2
} cfx_base_use;

typedef struct cfx_plugin {
  uint32_t struct_size;
  uint16_t abi_major;              /* CFX_ABI_MAJOR the plugin was built against */
  uint16_t abi_minor;
  const char* id;                  /* [a-z0-9_]+, unique among loaded plugins: the job's strategy */
  const char* version;             /* the plugin's own version, e.g. "1.0.0" */
  const char* description;         /* one line */
  uint32_t param_count;
  uint32_t pass_count;             /* >= 1; the last pass is a MAP */
  const cfx_param_spec* params;
  const cfx_pass* passes;
  uint32_t min_models;             /* >= 1 */
  uint32_t max_models;             /* 0: no limit */
  uint32_t base;                   /* cfx_base_use */
  uint32_t reserved;

  /* Called once per job after parameters are validated. Returns the instance through *instance.
     May reject a combination of parameters (host->fail + non-zero). `job` and everything it
     points to stay valid and unchanged until destroy() returns, so the instance may keep it. */
  int (*create)(const cfx_job* job, void** instance);
  /* Called once after the last pass (not after a failure); may report statistics. */
  int (*finish)(void* instance);
  /* Always called for a created instance, also after a failure. */
  void (*destroy)(void* instance);
} cfx_plugin;

/* ---------------------------------------------------------------------------------------------
 * The host's function table (append-only)
 * ------------------------------------------------------------------------------------------- */

typedef enum cfx_log_level {
  CFX_LOG_DEBUG = 0,
  CFX_LOG_INFO = 1,
  CFX_LOG_WARNING = 2,
  CFX_LOG_ERROR = 3
} cfx_log_level;

struct cfx_host {
  uint32_t struct_size;
  uint16_t abi_major;
  uint16_t abi_minor;

  /* Log one line (no newline needed) to the job's log. */
  void (*log)(cfx_context* ctx, int32_t level, const char* message);
  /* Record why the current callback fails; the first message of a job wins. */
  void (*fail)(cfx_context* ctx, const char* message);
  /* Attach a JSON object (UTF-8 text) describing the strategy's statistics; it is written to
     conflux-manifest.json under "report" and summarised in the log. Call from finish() (or
     reduce_done of a model-scope pass). The host copies the text. Returns 0, or non-zero if
     the text is not a JSON object. [not thread-safe] */
  int32_t (*set_report)(cfx_context* ctx, const char* json_object);

  /* Counter-based random numbers. `key` names a stream: host->random_key(seed, tensor name,
     model index). random_uniform fills out[k] with a uniform float in [0, 1) for element
     (first + k) of that stream, k < n; the value depends only on (key, element index), never on
     chunking or threads. Definition (stable across versions, so results reproduce forever):
       mix64(z):  z += 0x9E3779B97F4A7C15; z = (z ^ z>>30) * 0xBF58476D1CE4E5B9;
                  z = (z ^ z>>27) * 0x94D049BB133111EB; return z ^ z>>31      (SplitMix64)
       fmix32(h): h ^= h>>16; h *= 0x85EBCA6B; h ^= h>>13; h *= 0xC2B2AE35; return h ^ h>>16
       key  = mix64(mix64(mix64(seed) ^ fnv1a64(tensor name bytes)) ^ model)
       k0 = low 32 bits of key, k1 = high 32 bits; e = element index (64-bit)
       h  = fmix32(lo32(e) ^ k0);  h = fmix32(h ^ k1 ^ (hi32(e) * 0x9E3779B9))
       u  = (h >> 8) * 2^-24                                  (all arithmetic modulo 2^32/2^64)
     fnv1a64: offset basis 0xCBF29CE484222325, prime 0x100000001B3. */
  uint64_t (*random_key)(uint64_t seed, const char* tensor_name, uint32_t model);
  void (*random_uniform)(uint64_t key, uint64_t first, uint64_t n, float* out);

  /* Vectorised helpers (Highway kernels, best target of the CPU). Arrays may be unaligned. */
  /* y[k] += a * x[k] */
  void (*axpy)(float a, const float* x, float* y, uint64_t n);
  /* y[k] *= a */
  void (*scale)(float a, float* y, uint64_t n);
  /* sum of x[k] * y[k], accumulated in double in a fixed order (deterministic) */
  double (*dot)(const float* x, const float* y, uint64_t n);
};

/* True when `host` is new enough to have `field`. */
#define CFX_HOST_HAS(host, field) \
  ((host)->struct_size >= offsetof(cfx_host, field) + sizeof(((cfx_host*)0)->field))

/* The entry point: returns the plugin's descriptor (static storage, never freed), or NULL if
   the plugin cannot run with this host (after host->log explaining why, with ctx == NULL). */
typedef const cfx_plugin* (*cfx_plugin_entry_fn)(const cfx_host* host);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* CONFLUX_PLUGIN_H */
