// Tests of the vector kernels: every compiled Highway target against the plain scalar loops, an
// independent implementation of dot's specified summation order, an accurate reference sum, and
// an independent implementation of the random-number definition in sdk/include/conflux/plugin.h.
#include "conflux/kernels.h"

#include <gtest/gtest.h>
#include <hwy/targets.h>

#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "conflux/convert.h"  // convert_target_name(): the target dynamic dispatch chose

namespace conflux {
namespace {

using u32 = std::uint32_t;
using u64 = std::uint64_t;

u32 Bits(float f) { return std::bit_cast<u32>(f); }
float F32(u32 b) { return std::bit_cast<float>(b); }

// Runs `body` once per target that is both compiled into kernels.cc and supported by this CPU,
// forcing dynamic dispatch to that target; restores normal dispatch afterwards. Highway's chosen
// target is process-wide (every HWY_EXPORT table dispatches on it) and kernels.cc compiles the
// same target list as convert.cc, so convert_target_name() shows what the kernels run.
void ForEachTarget(const std::function<void()>& body) {
  struct Restore {
    ~Restore() {
      hwy::SetSupportedTargetsForTest(0);
      hwy::GetChosenTarget().DeInit();  // the next dispatch re-selects the best target
    }
  } restore;
  std::string tested;
  for (const std::int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    hwy::GetChosenTarget().DeInit();  // dispatch tables re-read the (mocked) targets
    ASSERT_STREQ(convert_target_name(), hwy::TargetName(target)) << "dispatch was not forced";
    SCOPED_TRACE(std::string("target ") + hwy::TargetName(target));
    body();
    tested += std::string(" ") + hwy::TargetName(target);
  }
  std::printf("[  targets ]%s\n", tested.c_str());
}

// Floats of every class. kModerate: zeros, subnormals and values of exponents within 2^+-20, so
// that sums round in interesting ways. kFinite adds extreme finite magnitudes; kSpecials also
// infinities and NaNs (quiet and signalling, both signs) and raw random bit patterns.
enum class Mix { kModerate, kFinite, kSpecials };

std::vector<float> TestFloats(std::size_t n, u64 seed, Mix mix) {
  static const u32 kFinite[] = {0x00000000u, 0x80000000u, 0x00000001u, 0x80000001u, 0x007FFFFFu,
                                0x00400000u, 0x00800000u, 0x7F7FFFFFu, 0xFF7FFFFFu, 0x3F800000u};
  static const u32 kSpecial[] = {0x7F800000u, 0xFF800000u, 0x7FC00000u, 0xFFC00001u,
                                 0x7F800001u, 0xFFA00000u};
  std::mt19937_64 rng(seed);
  std::vector<float> out(n);
  for (float& f : out) {
    const u64 r = rng();
    const auto bits = static_cast<u32>(r >> 32);
    const u64 kind = r % 16;
    if (kind == 0 && mix != Mix::kModerate) {
      f = F32(kFinite[(r >> 8) % std::size(kFinite)]);
    } else if (kind == 1) {
      f = F32(bits & 0x807FFFFFu);  // subnormal (or zero)
    } else if (kind == 2 && mix != Mix::kModerate) {
      f = F32((bits & 0x807FFFFFu) | static_cast<u32>((r >> 4) % 255) << 23);  // any finite
    } else if (kind == 3 && mix == Mix::kSpecials) {
      f = (r & 0x100) != 0 ? F32(kSpecial[(r >> 9) % std::size(kSpecial)]) : F32(bits);
    } else {
      f = F32((bits & 0x807FFFFFu) | static_cast<u32>(127 - 20 + (r >> 4) % 41) << 23);
    }
  }
  return out;
}

// Float arrays at a byte offset in a buffer with guard bytes on both sides.
constexpr std::size_t kGuard = 64;
constexpr unsigned char kFill = 0xA5;

struct Buffer {
  std::vector<unsigned char> bytes;
  std::size_t offset, n;

  Buffer(const float* values, std::size_t count, std::size_t misalign)
      : bytes(kGuard + misalign + count * sizeof(float) + kGuard, kFill),
        offset(kGuard + misalign),
        n(count) {
    if (count != 0) std::memcpy(bytes.data() + offset, values, count * sizeof(float));
  }
  // Possibly misaligned for float: only passed to the kernels, which access it by LoadU/memcpy.
  float* data() { return static_cast<float*>(static_cast<void*>(bytes.data() + offset)); }
  float at(std::size_t i) const {
    float f;
    std::memcpy(&f, bytes.data() + offset + i * sizeof(float), sizeof f);
    return f;
  }
  bool GuardsIntact() const {
    for (std::size_t i = 0; i < bytes.size(); ++i) {
      const bool inside = i >= offset && i < offset + n * sizeof(float);
      if (!inside && bytes[i] != kFill) return false;
    }
    return true;
  }
};

bool SameFloat(float got, float want) {
  return std::isnan(want) ? std::isnan(got) : Bits(got) == Bits(want);
}
bool SameDouble(double got, double want) {
  return std::isnan(want) ? std::isnan(got)
                          : std::bit_cast<u64>(got) == std::bit_cast<u64>(want);
}

std::vector<std::size_t> TestLengths() {
  std::vector<std::size_t> lengths;
  for (std::size_t n = 0; n <= 67; ++n) lengths.push_back(n);
  for (const std::size_t n : {127, 128, 129, 1000, 4099, 65539}) lengths.push_back(n);
  return lengths;
}

// ---------------------------------------------------------------------------------------------
// Element-wise kernels against the obvious scalar loops.

// The loops of kernels.h, literally. The product of axpy goes through a volatile so that it is
// rounded to float even if this file were compiled with FMA contraction.
void SubLoop(float* a, const float* b, std::size_t n) {
  for (std::size_t k = 0; k < n; ++k) a[k] -= b[k];
}
void AddLoop(float* a, const float* b, std::size_t n) {
  for (std::size_t k = 0; k < n; ++k) a[k] += b[k];
}
void AxpyLoop(float a, const float* x, float* y, std::size_t n) {
  for (std::size_t k = 0; k < n; ++k) {
    const volatile float product = a * x[k];
    y[k] += product;
  }
}
void ScaleLoop(float a, float* y, std::size_t n) {
  for (std::size_t k = 0; k < n; ++k) y[k] *= a;
}

struct Elementwise {
  std::string name;
  bool uses_x;
  std::function<void(float* y, const float* x, std::size_t n)> kernel, loop;
};

std::vector<Elementwise> ElementwiseCases() {
  std::vector<Elementwise> cases = {
      {"sub_f32", true, [](float* y, const float* x, std::size_t n) { sub_f32(y, x, n); },
       [](float* y, const float* x, std::size_t n) { SubLoop(y, x, n); }},
      {"add_f32", true, [](float* y, const float* x, std::size_t n) { add_f32(y, x, n); },
       [](float* y, const float* x, std::size_t n) { AddLoop(y, x, n); }},
  };
  const float scalars[] = {0.75f,
                           -3.0f,
                           1.0f / 3,
                           1e-30f,  // tiny: subnormal products
                           F32(0x00000003u),
                           1e30f,  // huge: overflowing products
                           0.0f,
                           -0.0f,
                           std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN()};
  for (const float a : scalars) {
    char hex[32];
    std::snprintf(hex, sizeof hex, "%a", static_cast<double>(a));
    cases.push_back({std::string("axpy_f32 a=") + hex, true,
                     [a](float* y, const float* x, std::size_t n) { axpy_f32(a, x, y, n); },
                     [a](float* y, const float* x, std::size_t n) { AxpyLoop(a, x, y, n); }});
    cases.push_back({std::string("scale_f32 a=") + hex, false,
                     [a](float* y, const float*, std::size_t n) { scale_f32(a, y, n); },
                     [a](float* y, const float*, std::size_t n) { ScaleLoop(a, y, n); }});
  }
  return cases;
}

TEST(KernelsElementwise, MatchScalarLoopsOnTailsAndMisalignment) {
  const auto lengths = TestLengths();
  const std::size_t max_n = lengths.back();
  const auto y0 = TestFloats(max_n, 1, Mix::kSpecials);
  const auto x0 = TestFloats(max_n, 2, Mix::kSpecials);
  const auto cases = ElementwiseCases();
  // The scalar loops' results, on aligned copies.
  std::vector<std::vector<float>> want;
  for (const Elementwise& c : cases) {
    std::vector<float> y = y0;
    c.loop(y.data(), x0.data(), max_n);
    want.push_back(std::move(y));
  }
  ForEachTarget([&] {
    for (std::size_t ci = 0; ci < cases.size(); ++ci) {
      const Elementwise& c = cases[ci];
      for (const std::size_t n : lengths) {
        for (const std::size_t y_off : {0, 1, 2}) {
          for (const std::size_t x_off : {0, 1, 2}) {
            if (!c.uses_x && x_off != 0) continue;
            Buffer y(y0.data(), n, y_off), x(x0.data(), n, x_off);
            const Buffer x_before = x;
            c.kernel(y.data(), x.data(), n);
            for (std::size_t i = 0; i < n; ++i) {
              ASSERT_TRUE(SameFloat(y.at(i), want[ci][i]))
                  << c.name << " n=" << n << " y+" << y_off << " x+" << x_off << " element " << i
                  << ": " << std::hexfloat << y.at(i) << ", loop " << want[ci][i] << " (y "
                  << y0[i] << ", x " << x0[i] << ")";
            }
            ASSERT_TRUE(y.GuardsIntact()) << c.name << " n=" << n << " wrote outside y";
            ASSERT_EQ(x.bytes, x_before.bytes) << c.name << " n=" << n << " modified x";
          }
        }
      }
    }
  });
}

// The random data above hold many cases where a fused multiply-add would round differently; this
// checks one explicitly: (1 + 2^-23)^2 = 1 + 2^-22 + 2^-46 rounds to 1 + 2^-22 as a float
// product, so adding -(1 + 2^-22) gives exactly 0, where an FMA would give 2^-46.
TEST(KernelsElementwise, AxpyIsNeverFused) {
  const float a = 1.0f + 0x1p-23f;
  std::vector<float> x(37, a), y(37, -(1.0f + 0x1p-22f));
  ForEachTarget([&] {
    std::vector<float> out = y;
    axpy_f32(a, x.data(), out.data(), out.size());
    for (const float v : out) ASSERT_EQ(Bits(v), 0u) << std::hexfloat << v;
  });
}

TEST(KernelsElementwise, SameArrayForBothOperands) {
  const auto v0 = TestFloats(1000, 3, Mix::kSpecials);
  ForEachTarget([&] {
    std::vector<float> v = v0, want = v0;
    sub_f32(v.data(), v.data(), v.size());
    for (float& w : want) w = w - w;
    for (std::size_t i = 0; i < v.size(); ++i) ASSERT_TRUE(SameFloat(v[i], want[i])) << i;
    v = v0;
    want = v0;
    add_f32(v.data(), v.data(), v.size());
    for (float& w : want) w = w + w;
    for (std::size_t i = 0; i < v.size(); ++i) ASSERT_TRUE(SameFloat(v[i], want[i])) << i;
  });
}

// ---------------------------------------------------------------------------------------------
// dot_f32.

// The order kernels.h specifies, written plainly.
double DotSpecifiedOrder(const float* x, const float* y, std::size_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (std::size_t k = 0; k < n; ++k) acc[k % 8] += static_cast<double>(x[k]) * y[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

double DotSequential(const float* x, const float* y, std::size_t n) {
  double s = 0;
  for (std::size_t k = 0; k < n; ++k) s += static_cast<double>(x[k]) * y[k];
  return s;
}

TEST(KernelsDot, MatchesSpecifiedOrderOnTailsAndMisalignment) {
  const auto lengths = TestLengths();
  const std::size_t max_n = lengths.back();
  struct Data {
    const char* name;
    std::vector<float> x, y;
  };
  const std::vector<Data> data = {
      // A number whose last bits depend on the order of the additions.
      {"moderate", TestFloats(max_n, 4, Mix::kModerate), TestFloats(max_n, 5, Mix::kModerate)},
      {"finite", TestFloats(max_n, 6, Mix::kFinite), TestFloats(max_n, 7, Mix::kFinite)},
      // Infinities and NaNs: only the short lengths (longer ones would all give NaN).
      {"specials", TestFloats(67, 8, Mix::kSpecials), TestFloats(67, 9, Mix::kSpecials)},
  };
  std::size_t order_sensitive = 0;
  for (const std::size_t n : lengths) {
    const float* x = data[0].x.data();
    const float* y = data[0].y.data();
    if (!SameDouble(DotSpecifiedOrder(x, y, n), DotSequential(x, y, n))) ++order_sensitive;
  }
  EXPECT_GT(order_sensitive, lengths.size() / 2) << "the data do not exercise the order";
  ForEachTarget([&] {
    for (const Data& d : data) {
      for (const std::size_t n : lengths) {
        if (n > d.x.size()) continue;
        const double want = DotSpecifiedOrder(d.x.data(), d.y.data(), n);
        for (const std::size_t x_off : {0, 1, 2}) {
          for (const std::size_t y_off : {0, 1, 2}) {
            Buffer x(d.x.data(), n, x_off), y(d.y.data(), n, y_off);
            const Buffer x_before = x, y_before = y;
            const double got = dot_f32(x.data(), y.data(), n);
            ASSERT_TRUE(SameDouble(got, want))
                << d.name << " n=" << n << " x+" << x_off << " y+" << y_off << ": "
                << std::hexfloat << got << ", spec " << want;
            ASSERT_EQ(x.bytes, x_before.bytes);
            ASSERT_EQ(y.bytes, y_before.bytes);
          }
        }
      }
    }
  });
}

// Hand-made products whose sum depends on the order; the expected values follow from the
// specification by hand. 2^30 * 2^30 = 2^60, and 2^60 + 1 rounds to 2^60 in double.
TEST(KernelsDot, SpecifiedOrderByHand) {
  struct Term {
    std::size_t k;
    float x, y;
  };
  struct Case {
    std::vector<Term> terms;  // the other elements are 0
    std::size_t n;
    double want;
  };
  const float b = 0x1p30f;
  const std::vector<Case> cases = {
      // acc0 = 2^60 - 2^60 = 0, acc1 = 1: 1 (a sequential sum loses the 1: 0).
      {{{0, b, b}, {1, 1, 1}, {8, -b, b}}, 9, 1.0},
      // acc0 = 2^60 - 2^60, acc4 = 1: 1 (four accumulators, k % 4, would give 0).
      {{{0, b, b}, {4, 1, 1}, {8, -b, b}}, 9, 1.0},
      // (acc0 + acc1) = 2^60 + 1 -> 2^60, then + (acc2 + acc3) = -2^60: 0 ((a0+a2)+a1 gives 1).
      {{{0, b, b}, {1, 1, 1}, {2, -b, b}}, 8, 0.0},
      // ((a0+a1)+(a2+a3)) = 1, ((a4+a5)+(a6+a7)) = 2^60 - 2^60 = 0: 1 (sequential: 0).
      {{{0, 1, 1}, {4, b, b}, {6, -b, b}}, 8, 1.0},
      // Elements 8, 16, 24 go back to acc0: 2^60 + 2^60 - 2^60 - 2^60 = 0, acc3 = 1: 1.
      {{{0, b, b}, {3, 1, 1}, {8, b, b}, {16, -b, b}, {24, -b, b}}, 32, 1.0},
      // All products -0: the accumulators start at +0, so +0.
      {{{0, -0.0f, 1}, {1, 1, -0.0f}}, 2, 0.0},
  };
  ForEachTarget([&] {
    for (std::size_t ci = 0; ci < cases.size(); ++ci) {
      const Case& c = cases[ci];
      // Leading zeros in multiples of 8 keep every element's accumulator; trailing zeros add
      // +0 to them. Both move the elements between the vector loop and the tail.
      for (const std::size_t lead : {0, 8, 16}) {
        for (const std::size_t trail : {0, 3, 13}) {
          std::vector<float> x(lead + c.n + trail, 0.0f), y(x.size(), 0.0f);
          for (const Term& t : c.terms) {
            x[lead + t.k] = t.x;
            y[lead + t.k] = t.y;
          }
          const double got = dot_f32(x.data(), y.data(), x.size());
          EXPECT_EQ(std::bit_cast<u64>(got), std::bit_cast<u64>(c.want))
              << "case " << ci << " lead " << lead << " trail " << trail << ": " << std::hexfloat
              << got;
          EXPECT_EQ(std::bit_cast<u64>(DotSpecifiedOrder(x.data(), y.data(), x.size())),
                    std::bit_cast<u64>(c.want))
              << "case " << ci;
        }
      }
    }
  });
}

// The result is close to the exact sum: within the worst-case bound of the specified order,
// (n/8 + 3) additions' worth of double rounding relative to the sum of |products|.
TEST(KernelsDot, CloseToAccurateSum) {
  std::mt19937_64 rng(8);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> positive(0.0f, 2.0f);
  for (const bool mixed_signs : {true, false}) {
    for (const std::size_t n : {1, 7, 8, 9, 63, 1000, 100000, 1 << 20}) {
      std::vector<float> x(n), y(n);
      for (std::size_t i = 0; i < n; ++i) {
        x[i] = mixed_signs ? normal(rng) : positive(rng);
        y[i] = mixed_signs ? normal(rng) * 1e-3f : positive(rng);
      }
      // Kahan summation in long double of the products (exact in long double).
      long double sum = 0, comp = 0, abs_sum = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const long double p = static_cast<long double>(x[i]) * y[i];
        abs_sum += std::fabs(p);
        const long double t = p - comp;
        const long double s = sum + t;
        comp = (s - sum) - t;
        sum = s;
      }
      const double bound =
          (static_cast<double>(n) / 8 + 3) * 0x1p-53 * static_cast<double>(abs_sum);
      ForEachTarget([&] {
        const double got = dot_f32(x.data(), y.data(), n);
        const double error = std::fabs(static_cast<double>(static_cast<long double>(got) - sum));
        EXPECT_LE(error, bound) << "n=" << n << " mixed=" << mixed_signs;
        if (!mixed_signs) {  // all products >= 0: a relative bound on the result itself
          EXPECT_LE(error, 1e-12 * static_cast<double>(sum)) << "n=" << n;
        }
      });
    }
  }
}

TEST(KernelsDot, InfinitiesAndNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  ForEachTarget([&] {
    for (const std::size_t n : {1, 9, 40}) {
      std::vector<float> x(n, 1.0f), y(n, 2.0f);
      x[n - 1] = inf;
      EXPECT_EQ(dot_f32(x.data(), y.data(), n), static_cast<double>(inf)) << n;
      y[n - 1] = -1.0f;
      EXPECT_EQ(dot_f32(x.data(), y.data(), n), -static_cast<double>(inf)) << n;
      y[n - 1] = 0.0f;  // inf * 0
      EXPECT_TRUE(std::isnan(dot_f32(x.data(), y.data(), n))) << n;
      y[n - 1] = 1.0f;
      x[0] = n > 1 ? -inf : inf;  // inf - inf (in the final sum or in one accumulator)
      if (n > 1) {
        EXPECT_TRUE(std::isnan(dot_f32(x.data(), y.data(), n))) << n;
      }
      x[0] = nan;
      EXPECT_TRUE(std::isnan(dot_f32(x.data(), y.data(), n))) << n;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Random numbers: an independent, straightforward implementation of the definition.

u64 SplitMix64(u64 z) {
  z = z + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
u32 Fmix32(u32 h) {
  h = h ^ (h >> 16);
  h = h * 0x85EBCA6Bu;
  h = h ^ (h >> 13);
  h = h * 0xC2B2AE35u;
  return h ^ (h >> 16);
}
u64 Fnv1a64(const std::string& bytes) {
  u64 h = 0xCBF29CE484222325ull;
  for (const char c : bytes) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001B3ull;
  return h;
}
u64 DefinedKey(u64 seed, const std::string& name, u32 model) {
  return SplitMix64(SplitMix64(SplitMix64(seed) ^ Fnv1a64(name)) ^ model);
}
float DefinedUniform(u64 key, u64 e) {
  const u32 k0 = static_cast<u32>(key & 0xFFFFFFFFu), k1 = static_cast<u32>(key >> 32);
  const u32 lo = static_cast<u32>(e & 0xFFFFFFFFu), hi = static_cast<u32>(e >> 32);
  u32 h = Fmix32(lo ^ k0);
  h = Fmix32(h ^ k1 ^ static_cast<u32>(hi * 0x9E3779B9u));
  return static_cast<float>(std::ldexp(static_cast<double>(h >> 8), -24));
}

TEST(KernelsRandom, HelpersMatchPublishedTestVectors) {
  // FNV-1a 64-bit test vectors, and the first outputs of SplitMix64 seeded with 0 (each output
  // is mix64 of the state before its increment), and MurmurHash3's fmix32(1).
  EXPECT_EQ(Fnv1a64(""), 0xCBF29CE484222325ull);
  EXPECT_EQ(Fnv1a64("a"), 0xAF63DC4C8601EC8Cull);
  EXPECT_EQ(Fnv1a64("foobar"), 0x85944171F73967E8ull);
  EXPECT_EQ(SplitMix64(0), 0xE220A8397B1DCDAFull);
  EXPECT_EQ(SplitMix64(0x9E3779B97F4A7C15ull), 0x6E789E6AA1B965F4ull);
  EXPECT_EQ(SplitMix64(0x3C6EF372FE94F82Aull), 0x06C45D188009454Full);
  EXPECT_EQ(Fmix32(0), 0u);
  EXPECT_EQ(Fmix32(1), 0x514E28B7u);
}

TEST(KernelsRandom, KeyMatchesDefinition) {
  const std::string name = "model.layers.0.mlp.down_proj.weight";
  EXPECT_EQ(random_key(0, "", 0), DefinedKey(0, "", 0));
  EXPECT_EQ(random_key(42, name.c_str(), 3), DefinedKey(42, name, 3));
  // The same values as literals: the definition is stable across versions.
  EXPECT_EQ(random_key(0, "", 0), 0xA6BBC8DCBE30928Cull) << std::hex << random_key(0, "", 0);
  EXPECT_EQ(random_key(42, name.c_str(), 3), 0xEC5486978DB40291ull)
      << std::hex << random_key(42, name.c_str(), 3);
  EXPECT_EQ(random_key(7, "w", 0xFFFFFFFFu), SplitMix64(SplitMix64(SplitMix64(7) ^ Fnv1a64("w")) ^ 0xFFFFFFFFull));
  // The name's bytes are hashed as unsigned bytes, UTF-8 included.
  EXPECT_EQ(random_key(7, "\xC3\xA9t\xC3\xA9", 1), DefinedKey(7, "\xC3\xA9t\xC3\xA9", 1));
  std::mt19937_64 rng(9);
  for (int i = 0; i < 1000; ++i) {
    const u64 seed = rng();
    const auto model = static_cast<u32>(rng());
    const std::string n = "t." + std::to_string(rng() % 1000);
    ASSERT_EQ(random_key(seed, n.c_str(), model), DefinedKey(seed, n, model));
  }
}

// Every combination of inputs gives its own key (the hash is chained, not a symmetric XOR).
TEST(KernelsRandom, KeysDifferForDifferentInputs) {
  const u64 seeds[] = {0, 1, 2, 42, ~0ull};
  const char* names[] = {"", "a", "b", "ab", "ba", "layer.0.weight", "layer.1.weight"};
  const u32 models[] = {0, 1, 2, 7, 0xFFFFFFFFu};
  for (const u64 seed : seeds) {
    for (const char* name : names) {
      std::set<u64> keys;
      for (const u32 model : models) keys.insert(random_key(seed, name, model));
      EXPECT_EQ(keys.size(), std::size(models)) << seed << " " << name;
    }
    for (const u32 model : models) {
      std::set<u64> keys;
      for (const char* name : names) keys.insert(random_key(seed, name, model));
      EXPECT_EQ(keys.size(), std::size(names)) << seed << " " << model;
    }
  }
  for (const char* name : names) {
    for (const u32 model : models) {
      std::set<u64> keys;
      for (const u64 seed : seeds) keys.insert(random_key(seed, name, model));
      EXPECT_EQ(keys.size(), std::size(seeds)) << name << " " << model;
    }
  }
  std::set<u64> all;
  for (u64 seed = 0; seed < 16; ++seed)
    for (const char* name : names)
      for (u32 model = 0; model < 16; ++model) all.insert(random_key(seed, name, model));
  EXPECT_EQ(all.size(), 16u * std::size(names) * 16u);
}

TEST(KernelsRandom, ScalarReferenceMatchesDefinition) {
  std::mt19937_64 rng(10);
  const u64 edges[] = {0, 1, 0xFFFFFFFFull, 0x100000000ull, 0x100000001ull, (1ull << 40) + 5,
                       ~0ull};
  for (int i = 0; i < 200000; ++i) {
    const u64 key = i < 1000 ? random_key(rng(), "w", static_cast<u32>(i)) : rng();
    const u64 e = i % 2 == 0 ? edges[static_cast<std::size_t>(i / 2) % std::size(edges)] : rng();
    const float got = random_uniform_at(key, e);
    ASSERT_EQ(Bits(got), Bits(DefinedUniform(key, e))) << std::hex << key << " " << e;
    ASSERT_GE(got, 0.0f);
    ASSERT_LT(got, 1.0f);
  }
}

TEST(KernelsRandom, VectorMatchesScalarOnEveryTarget) {
  std::vector<std::size_t> lengths;
  for (std::size_t n = 0; n <= 67; ++n) lengths.push_back(n);
  for (const std::size_t n : {127, 128, 129, 1000, 4099}) lengths.push_back(n);
  const u64 keys[] = {0, ~0ull, 0x0123456789ABCDEFull, random_key(1, "layer.0.weight", 0),
                      random_key(1, "layer.0.weight", 1)};
  const u64 firsts[] = {0,
                        1,
                        7,
                        (1ull << 32) - 3,  // crosses into hi32 = 1 inside the call
                        (1ull << 33) - 1,
                        (1ull << 40) + 5,
                        ~0ull - 4};  // wraps modulo 2^64
  const std::vector<float> junk(lengths.back(), F32(0x7FBADBADu));  // overwritten
  ForEachTarget([&] {
    for (const u64 key : keys) {
      for (const u64 first : firsts) {
        for (const std::size_t n : lengths) {
          for (const std::size_t off : {0, 1, 2}) {
            Buffer out(junk.data(), n, off);
            random_uniform(key, first, n, out.data());
            for (std::size_t i = 0; i < n; ++i) {
              ASSERT_EQ(Bits(out.at(i)), Bits(random_uniform_at(key, first + i)))
                  << std::hex << "key " << key << " first " << first << std::dec << " n=" << n
                  << " out+" << off << " element " << i;
            }
            ASSERT_TRUE(out.GuardsIntact()) << "n=" << n << " wrote outside";
          }
        }
      }
    }
  });
}

TEST(KernelsRandom, CrossesThe32BitBoundary) {
  const u64 key = random_key(5, "x", 2);
  const u64 first = (1ull << 32) - 3;
  ForEachTarget([&] {
    for (const std::size_t n : {4, 8, 16, 35, 100}) {
      std::vector<float> out(n);
      random_uniform(key, first, n, out.data());
      for (std::size_t i = 0; i < n; ++i) {
        ASSERT_EQ(Bits(out[i]), Bits(DefinedUniform(key, first + i))) << "n=" << n << " " << i;
      }
      // Element 2^32 has lo32 = 0 but hi32 = 1: it is not element 0 again.
      EXPECT_NE(Bits(out[3]), Bits(random_uniform_at(key, 0)));
    }
  });
}

TEST(KernelsRandom, IndependentOfChunking) {
  const u64 key = random_key(11, "chunks", 0);
  const u64 first = (1ull << 32) - 5000;
  const std::size_t n = 20000;
  std::vector<float> whole(n);
  random_uniform(key, first, n, whole.data());
  std::mt19937_64 rng(12);
  ForEachTarget([&] {
    std::vector<float> pieces(n);
    for (std::size_t i = 0; i < n;) {
      const std::size_t len = std::min<std::size_t>(n - i, rng() % 300);
      random_uniform(key, first + i, len, pieces.data() + i);
      i += len;
    }
    for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(Bits(pieces[i]), Bits(whole[i])) << i;
  });
}

TEST(KernelsRandom, UniformStatistics) {
  const std::size_t n = 1000000;
  std::vector<float> out(n);
  random_uniform(random_key(2024, "stats", 0), 123, n, out.data());
  double sum = 0;
  std::size_t below = 0;
  for (const float v : out) {
    ASSERT_GE(v, 0.0f);
    ASSERT_LT(v, 1.0f);
    const double scaled = std::ldexp(static_cast<double>(v), 24);
    ASSERT_EQ(scaled, std::floor(scaled)) << "not a multiple of 2^-24";
    sum += v;
    below += v < 0.2f ? 1 : 0;
  }
  const double dn = static_cast<double>(n);
  const double mean = sum / dn;
  EXPECT_LE(std::fabs(mean - 0.5), 4 * std::sqrt(1.0 / 12 / dn)) << mean;
  const double fraction = static_cast<double>(below) / dn;
  EXPECT_LE(std::fabs(fraction - 0.2), 4 * std::sqrt(0.2 * 0.8 / dn)) << fraction;
}

TEST(KernelsRandom, DifferentStreamsDiffer) {
  const std::size_t n = 4096;
  const u64 base = random_key(1, "w", 0);
  const u64 others[] = {random_key(1, "w", 1), random_key(2, "w", 0), random_key(1, "v", 0),
                        base + 1, base ^ (1ull << 40)};
  std::vector<float> a(n), b(n);
  random_uniform(base, 0, n, a.data());
  for (const u64 key : others) {
    random_uniform(key, 0, n, b.data());
    std::size_t same = 0;
    for (std::size_t i = 0; i < n; ++i) same += a[i] == b[i] ? 1 : 0;
    EXPECT_LE(same, 2u) << std::hex << key;  // about n / 2^24 expected
  }
  // The same stream at another offset is not a shifted copy of itself either.
  random_uniform(base, 1, n, b.data());
  std::size_t same = 0;
  for (std::size_t i = 0; i < n; ++i) same += a[i] == b[i] ? 1 : 0;
  EXPECT_LE(same, 2u);
}

// ---------------------------------------------------------------------------------------------

TEST(KernelsDispatch, ZeroLengthAcceptsNullPointers) {
  ForEachTarget([] {
    sub_f32(nullptr, nullptr, 0);
    add_f32(nullptr, nullptr, 0);
    axpy_f32(2.0f, nullptr, nullptr, 0);
    scale_f32(2.0f, nullptr, 0);
    EXPECT_EQ(std::bit_cast<u64>(dot_f32(nullptr, nullptr, 0)), 0u);  // +0
    random_uniform(1, 2, 0, nullptr);
  });
}

TEST(KernelsDispatch, EveryCompiledTargetRuns) {
  const auto targets = hwy::SupportedAndGeneratedTargets();
  ASSERT_FALSE(targets.empty());
  std::size_t runs = 0;
  ForEachTarget([&] { ++runs; });
  EXPECT_EQ(runs, targets.size());
  EXPECT_STREQ(convert_target_name(), hwy::TargetName(targets.front()));
}

}  // namespace
}  // namespace conflux
