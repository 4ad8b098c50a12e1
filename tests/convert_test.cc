// Tests of the float conversion kernels: the scalar references against independent oracles, and
// every compiled Highway target against the references, bit for bit.
#include "conflux/convert.h"

#include <gtest/gtest.h>
#include <hwy/targets.h>

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define CONFLUX_TEST_X86 1
#else
#define CONFLUX_TEST_X86 0
#endif

namespace conflux {
namespace {

using u16 = std::uint16_t;
using u32 = std::uint32_t;

u32 Bits(float f) { return std::bit_cast<u32>(f); }
float F32(u32 b) { return std::bit_cast<float>(b); }

// Runs `body` once per target that is both compiled into convert.cc and supported by this CPU,
// forcing dynamic dispatch to that target; restores normal dispatch afterwards.
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

// ---------------------------------------------------------------------------------------------
// Independent oracles, in double precision.

double F16Value(u16 h) {
  const int sign = h >> 15;
  const int exp = (h >> 10) & 0x1F;
  const int mant = h & 0x3FF;
  double v;
  if (exp == 0x1F) {
    v = mant == 0 ? std::numeric_limits<double>::infinity()
                  : std::numeric_limits<double>::quiet_NaN();
  } else if (exp == 0) {
    v = std::ldexp(mant, -24);
  } else {
    v = std::ldexp(1024 + mant, exp - 25);
  }
  return sign ? -v : v;
}

double BF16Value(u16 b) { return static_cast<double>(F32(static_cast<u32>(b) << 16)); }

// Magnitudes of the non-negative finite values of a 16-bit format, indexed by bit pattern, plus
// one entry for the pattern of +Inf holding the next value the format would have with an
// unbounded exponent: IEEE rounds to Inf exactly when the value rounds to that.
struct Format {
  std::vector<double> values;
  u16 inf;
};

const Format& F16Format() {
  static const Format f = [] {
    Format r{{}, 0x7C00};
    for (u32 h = 0; h < 0x7C00; ++h) r.values.push_back(F16Value(static_cast<u16>(h)));
    r.values.push_back(65536.0);
    return r;
  }();
  return f;
}

const Format& BF16Format() {
  static const Format f = [] {
    Format r{{}, 0x7F80};
    for (u32 b = 0; b < 0x7F80; ++b) r.values.push_back(BF16Value(static_cast<u16>(b)));
    r.values.push_back(std::ldexp(1.0, 128));
    return r;
  }();
  return f;
}

// Nearest value of `fmt`, ties to the even bit pattern. NaN inputs give 0xFFFF (checked apart).
u16 OracleNarrow(float x, const Format& fmt) {
  if (std::isnan(x)) return 0xFFFF;
  const u16 sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= fmt.values.back()) return static_cast<u16>(sign | fmt.inf);
  // values[lo] <= a < values[lo + 1]
  const auto it = std::upper_bound(fmt.values.begin(), fmt.values.end(), a);
  const auto lo = static_cast<u32>(it - fmt.values.begin() - 1);
  const double twice = 2 * a, mid2 = fmt.values[lo] + fmt.values[lo + 1];  // both exact
  u32 r;
  if (twice < mid2) {
    r = lo;
  } else if (twice > mid2) {
    r = lo + 1;
  } else {
    r = (lo & 1) ? lo + 1 : lo;
  }
  return static_cast<u16>(sign | r);
}

// ---------------------------------------------------------------------------------------------
// Inputs.

std::vector<u16> AllU16() {
  std::vector<u16> v(65536);
  for (u32 i = 0; i < 65536; ++i) v[i] = static_cast<u16>(i);
  return v;
}

// Every representable value, every midpoint between neighbours (both parities of the lower
// neighbour) and the floats just either side of each, both signs; plus specials.
std::vector<float> NarrowingCases(const Format& fmt) {
  std::vector<float> v;
  const auto add_both = [&v](float f) {
    v.push_back(f);
    v.push_back(-f);
  };
  for (std::size_t i = 0; i + 1 < fmt.values.size(); ++i) {
    const auto value = static_cast<float>(fmt.values[i]);
    const auto mid = static_cast<float>((fmt.values[i] + fmt.values[i + 1]) / 2);
    EXPECT_EQ(static_cast<double>(mid), (fmt.values[i] + fmt.values[i + 1]) / 2) << i;
    add_both(value);
    add_both(mid);
    add_both(std::nextafter(mid, 0.0f));
    add_both(std::nextafter(mid, FLT_MAX));
    add_both(std::nextafter(value, 0.0f));
    add_both(std::nextafter(value, FLT_MAX));
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (const float f : {0.0f, inf, FLT_MAX, FLT_MIN, std::nextafter(0.0f, 1.0f),
                        std::nextafter(FLT_MIN, 0.0f), 65504.0f, 65520.0f,
                        std::nextafter(65520.0f, 0.0f), std::nextafter(65520.0f, inf), 65536.0f,
                        0x1p-24f, 0x1p-25f, std::nextafter(0x1p-25f, 1.0f),
                        std::nextafter(0x1p-25f, 0.0f), 0x3p-26f, 0x1p-14f, 0x1.ff8p-15f,
                        0x1.ffcp-15f, 3.0e38f, 0x1.fffep127f, 0x1.ffffp127f, 1.0f, 1.0f / 3}) {
    add_both(f);
  }
  // Each exponent with mantissas around the f16 and bf16 rounding points.
  for (u32 e = 0; e < 256; ++e) {
    for (const u32 m : {0x0u, 0x1u, 0xFFFu, 0x1000u, 0x1001u, 0x2000u, 0x3000u, 0x7FFFu,
                        0x8000u, 0x8001u, 0x18000u, 0x400000u, 0x7FFFFFu, 0x7FE000u,
                        0x7FF000u, 0x7FEFFFu, 0x7F8000u, 0x7F7FFFu}) {
      v.push_back(F32((e << 23) | m));
      v.push_back(F32(0x80000000u | (e << 23) | m));
    }
  }
  return v;
}

// NaNs with assorted payloads: signalling, quiet, payload only in the low 13 or 16 bits.
std::vector<u32> NaNBits() {
  std::vector<u32> v;
  for (const u32 m : {0x000001u, 0x000FFFu, 0x001000u, 0x002000u, 0x00FFFFu, 0x010000u,
                      0x200000u, 0x3FFFFFu, 0x400000u, 0x400001u, 0x7FFFFFu, 0x155555u}) {
    v.push_back(0x7F800000u | m);
    v.push_back(0xFF800000u | m);
  }
  return v;
}

std::vector<float> RandomFloats(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> v(n);
  for (auto& f : v) {
    u32 b = static_cast<u32>(rng());
    // Half of them with exponents where 16-bit formats round (2^-27 .. 2^18).
    if (b & 1u) b = (b & 0x807FFFFFu) | ((100u + (b >> 24) % 46u) << 23);
    f = F32(b);
  }
  return v;
}

// Compares a kernel's output with the scalar reference, bit for bit (NaN payloads included: the
// kernels must agree on every target).
template <typename T>
void ExpectBitsEqual(const std::vector<T>& got, const std::vector<T>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  std::size_t failures = 0;
  for (std::size_t i = 0; i < got.size() && failures < 10; ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      ++failures;
      ADD_FAILURE() << what << " element " << i;
    }
  }
}

std::vector<u16> NarrowBF16(const std::vector<float>& in) {
  std::vector<u16> out(in.size());
  f32_to_bf16(in.data(), out.data(), in.size());
  return out;
}
std::vector<u16> NarrowF16(const std::vector<float>& in) {
  std::vector<u16> out(in.size());
  f32_to_f16(in.data(), out.data(), in.size());
  return out;
}
template <typename Fn>
std::vector<u16> MapRef(const std::vector<float>& in, Fn ref) {
  std::vector<u16> out;
  for (const float f : in) out.push_back(ref(f));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Scalar references against the oracles.

TEST(ConvertReference, BF16WideningIsTheHighHalf) {
  for (const u16 b : AllU16()) {
    const float got = bf16_bits_to_f32(b);
    ASSERT_EQ(Bits(got), static_cast<u32>(b) << 16) << std::hex << b;
  }
}

TEST(ConvertReference, F16WideningMatchesLdexp) {
  for (const u16 h : AllU16()) {
    const float got = f16_bits_to_f32(h);
    const double want = F16Value(h);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << h;
      ASSERT_EQ(std::signbit(got), std::signbit(F32(static_cast<u32>(h) << 16))) << h;
    } else {
      ASSERT_EQ(Bits(got), Bits(static_cast<float>(want))) << std::hex << h;
    }
  }
}

TEST(ConvertReference, NaNPayloadsFollowX86) {
  // Widening: quiet bit set, payload shifted up. Narrowing: quiet bit set, top payload bits.
  EXPECT_EQ(Bits(f16_bits_to_f32(0x7C01)), 0x7FC02000u);
  EXPECT_EQ(Bits(f16_bits_to_f32(0xFE00)), 0xFFC00000u);
  EXPECT_EQ(Bits(f16_bits_to_f32(0x7FFF)), 0x7FFFE000u);
  EXPECT_EQ(f32_to_f16_bits(F32(0x7F800001u)), 0x7E00);
  EXPECT_EQ(f32_to_f16_bits(F32(0x7F802000u)), 0x7E01);
  EXPECT_EQ(f32_to_f16_bits(F32(0xFFA00000u)), 0xFF00);
  EXPECT_EQ(f32_to_bf16_bits(F32(0x7F800001u)), 0x7FC0);
  EXPECT_EQ(f32_to_bf16_bits(F32(0xFFFFFFFFu)), 0xFFFF);
  EXPECT_EQ(f32_to_bf16_bits(F32(0x7F81FFFFu)), 0x7FC1);
}

TEST(ConvertReference, NarrowingBoundaries) {
  EXPECT_EQ(f32_to_f16_bits(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16_bits(std::nextafter(65520.0f, 0.0f)), 0x7BFF);
  EXPECT_EQ(f32_to_f16_bits(65520.0f), 0x7C00);
  EXPECT_EQ(f32_to_f16_bits(-FLT_MAX), 0xFC00);
  EXPECT_EQ(f32_to_f16_bits(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16_bits(0x1p-25f), 0x0000);                         // tie to even (0)
  EXPECT_EQ(f32_to_f16_bits(std::nextafter(0x1p-25f, 1.0f)), 0x0001);
  EXPECT_EQ(f32_to_f16_bits(0x3p-25f), 0x0002);                         // 1.5 ulp: tie to 2
  EXPECT_EQ(f32_to_f16_bits(0x1.ffcp-15f), 0x0400);                     // rounds up to normal
  EXPECT_EQ(f32_to_bf16_bits(FLT_MAX), 0x7F80);                         // RNE overflow to Inf
  EXPECT_EQ(f32_to_bf16_bits(F32(0x3F808000u)), 0x3F80);                // tie, even kept
  EXPECT_EQ(f32_to_bf16_bits(F32(0x3F818000u)), 0x3F82);                // tie, odd rounds up
  EXPECT_EQ(f32_to_bf16_bits(F32(0x00000001u)), 0x0000);
  EXPECT_EQ(f32_to_bf16_bits(F32(0x00008000u)), 0x0000);
  EXPECT_EQ(f32_to_bf16_bits(F32(0x00018000u)), 0x0002);
}

void CheckNarrowingOracle(const std::vector<float>& in, const Format& fmt,
                          u16 (*ref)(float), const char* what) {
  std::size_t failures = 0;
  for (const float f : in) {
    const u16 got = ref(f);
    if (std::isnan(f)) {
      const bool nan = (got & 0x7FFF) > fmt.inf;
      const bool sign_kept = ((got & 0x8000) != 0) == std::signbit(f);
      if (!nan || !sign_kept) {
        ADD_FAILURE() << what << " NaN " << std::hex << Bits(f) << " -> " << got;
        ++failures;
      }
    } else if (got != OracleNarrow(f, fmt)) {
      ADD_FAILURE() << what << " " << std::hexfloat << f << " -> " << std::hex << got
                    << ", oracle " << OracleNarrow(f, fmt);
      ++failures;
    }
    if (failures >= 10) return;
  }
}

TEST(ConvertReference, F16NarrowingMatchesOracle) {
  auto in = NarrowingCases(F16Format());
  for (const u32 b : NaNBits()) in.push_back(F32(b));
  const auto random = RandomFloats(1 << 20, 1);
  in.insert(in.end(), random.begin(), random.end());
  CheckNarrowingOracle(in, F16Format(), f32_to_f16_bits, "f16");
}

TEST(ConvertReference, BF16NarrowingMatchesOracle) {
  auto in = NarrowingCases(BF16Format());
  for (const u32 b : NaNBits()) in.push_back(F32(b));
  const auto random = RandomFloats(1 << 20, 2);
  in.insert(in.end(), random.begin(), random.end());
  CheckNarrowingOracle(in, BF16Format(), f32_to_bf16_bits, "bf16");
}

TEST(ConvertReference, RoundTripsEveryNonNaN) {
  for (const u16 h : AllU16()) {
    if ((h & 0x7FFF) <= 0x7C00) {
      ASSERT_EQ(f32_to_f16_bits(f16_bits_to_f32(h)), h) << std::hex << h;
    }
    if ((h & 0x7FFF) <= 0x7F80) {
      ASSERT_EQ(f32_to_bf16_bits(bf16_bits_to_f32(h)), h) << std::hex << h;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels on every target against the references.

TEST(ConvertKernels, DispatchesToEveryCompiledTarget) {
  const auto targets = hwy::SupportedAndGeneratedTargets();
  ASSERT_FALSE(targets.empty());
  std::size_t runs = 0;
  ForEachTarget([&] { ++runs; });
  EXPECT_EQ(runs, targets.size());
  // Normal dispatch is restored: the best target (lowest bit) again.
  EXPECT_STREQ(convert_target_name(), hwy::TargetName(targets.front()));
}

TEST(ConvertKernels, WideningAllBitPatterns) {
  const auto all = AllU16();
  std::vector<float> want_bf16, want_f16;
  for (const u16 h : all) {
    want_bf16.push_back(bf16_bits_to_f32(h));
    want_f16.push_back(f16_bits_to_f32(h));
  }
  ForEachTarget([&] {
    std::vector<float> got(all.size());
    bf16_to_f32(all.data(), got.data(), all.size());
    ExpectBitsEqual(got, want_bf16, "bf16->f32");
    f16_to_f32(all.data(), got.data(), all.size());
    ExpectBitsEqual(got, want_f16, "f16->f32");
    // The oracles directly as well, not only through the reference.
    for (std::size_t i = 0; i < all.size(); ++i) {
      ASSERT_EQ(Bits(got[i]) & 0x80000000u, (all[i] & 0x8000u) << 16);
      const double want = F16Value(all[i]);
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(got[i])) << i;
      } else {
        ASSERT_EQ(Bits(got[i]), Bits(static_cast<float>(want))) << i;
      }
    }
  });
}

TEST(ConvertKernels, NarrowingMatchesReference) {
  std::vector<float> in = NarrowingCases(F16Format());
  const auto bf16_cases = NarrowingCases(BF16Format());
  in.insert(in.end(), bf16_cases.begin(), bf16_cases.end());
  for (const u32 b : NaNBits()) in.push_back(F32(b));
  const auto want_bf16 = MapRef(in, f32_to_bf16_bits);
  const auto want_f16 = MapRef(in, f32_to_f16_bits);
  ForEachTarget([&] {
    ExpectBitsEqual(NarrowBF16(in), want_bf16, "f32->bf16");
    ExpectBitsEqual(NarrowF16(in), want_f16, "f32->f16");
  });
}

TEST(ConvertKernels, NarrowingRandomBitPatterns) {
  const auto in = RandomFloats(4 << 20, 3);
  const auto want_bf16 = MapRef(in, f32_to_bf16_bits);
  const auto want_f16 = MapRef(in, f32_to_f16_bits);
  ForEachTarget([&] {
    ExpectBitsEqual(NarrowBF16(in), want_bf16, "f32->bf16");
    ExpectBitsEqual(NarrowF16(in), want_f16, "f32->f16");
  });
}

TEST(ConvertKernels, DoubleConversionsMatchCasts) {
  std::vector<double> in = {0.0,
                            -0.0,
                            1.0 / 3,
                            1e300,
                            -1e300,
                            1e-300,
                            static_cast<double>(FLT_MAX),
                            0x1.fffffefffffffp127,  // just under FLT_MAX + half ulp: FLT_MAX
                            0x1.ffffffp127,         // FLT_MAX + half ulp, odd: ties up to Inf
                            0x1.000001p0,           // tie between 1 and 1 + 2^-23: to 1
                            0x1.000003p0,           // tie, odd below: up
                            0x1p-149,
                            0x1p-150,               // tie between 0 and the smallest denormal
                            0x1.8p-150,
                            std::numeric_limits<double>::infinity(),
                            -std::numeric_limits<double>::infinity(),
                            std::numeric_limits<double>::quiet_NaN(),
                            std::bit_cast<double>(0xFFF0000000000001ull),
                            std::bit_cast<double>(0x7FF0000020000000ull)};
  std::mt19937_64 rng(4);
  for (int i = 0; i < (1 << 16); ++i) {
    std::uint64_t b = rng();
    if (b & 1) b = (b & 0x800FFFFFFFFFFFFFull) | ((860ull + (b >> 53) % 330) << 52);
    in.push_back(std::bit_cast<double>(b));
  }
  std::vector<float> want, floats;
  std::vector<double> want_wide;
  for (const double d : in) want.push_back(static_cast<float>(d));
  for (const float f : RandomFloats(1 << 16, 5)) floats.push_back(f);
  for (const u32 b : NaNBits()) floats.push_back(F32(b));
  for (const float f : floats) want_wide.push_back(static_cast<double>(f));
  EXPECT_EQ(Bits(want[7]), Bits(FLT_MAX));
  EXPECT_TRUE(std::isinf(want[8]));
  EXPECT_EQ(want[9], 1.0f);
  EXPECT_EQ(Bits(want[12]), 0u);
  ForEachTarget([&] {
    std::vector<float> got(in.size());
    f64_to_f32(in.data(), got.data(), in.size());
    ExpectBitsEqual(got, want, "f64->f32");
    std::vector<double> wide(floats.size());
    f32_to_f64(floats.data(), wide.data(), floats.size());
    ExpectBitsEqual(wide, want_wide, "f32->f64");
  });
}

// One kernel seen through bytes, with the reference for a single element.
struct Kernel {
  const char* name;
  std::size_t in_size, out_size;
  std::function<void(const void*, void*, std::size_t)> run;
  std::function<void(const unsigned char*, unsigned char*)> ref;
};

template <typename In, typename Out, typename Ref>
std::function<void(const unsigned char*, unsigned char*)> ElementRef(Ref ref) {
  return [ref](const unsigned char* in, unsigned char* out) {
    In x;
    std::memcpy(&x, in, sizeof x);
    const Out y = static_cast<Out>(ref(x));
    std::memcpy(out, &y, sizeof y);
  };
}

std::vector<Kernel> AllKernels() {
  const auto identity = [](float f) { return f; };
  return {
      {"bf16_to_f32", 2, 4,
       [](const void* s, void* d, std::size_t n) { bf16_to_f32(s, static_cast<float*>(d), n); },
       ElementRef<u16, float>(bf16_bits_to_f32)},
      {"f16_to_f32", 2, 4,
       [](const void* s, void* d, std::size_t n) { f16_to_f32(s, static_cast<float*>(d), n); },
       ElementRef<u16, float>(f16_bits_to_f32)},
      {"f64_to_f32", 8, 4,
       [](const void* s, void* d, std::size_t n) { f64_to_f32(s, static_cast<float*>(d), n); },
       ElementRef<double, float>([](double x) { return static_cast<float>(x); })},
      {"f32_to_f32", 4, 4,
       [](const void* s, void* d, std::size_t n) { f32_to_f32(s, static_cast<float*>(d), n); },
       ElementRef<float, float>(identity)},
      {"f32_to_bf16", 4, 2,
       [](const void* s, void* d, std::size_t n) {
         f32_to_bf16(static_cast<const float*>(s), d, n);
       },
       ElementRef<float, u16>(f32_to_bf16_bits)},
      {"f32_to_f16", 4, 2,
       [](const void* s, void* d, std::size_t n) {
         f32_to_f16(static_cast<const float*>(s), d, n);
       },
       ElementRef<float, u16>(f32_to_f16_bits)},
      {"f32_to_f64", 4, 8,
       [](const void* s, void* d, std::size_t n) {
         f32_to_f64(static_cast<const float*>(s), d, n);
       },
       ElementRef<float, double>([](float x) { return static_cast<double>(x); })},
      {"f32_to_f32_out", 4, 4,
       [](const void* s, void* d, std::size_t n) {
         f32_to_f32_out(static_cast<const float*>(s), d, n);
       },
       ElementRef<float, float>(identity)},
  };
}

TEST(ConvertKernels, TailsAndMisalignment) {
  std::vector<std::size_t> lengths;
  for (std::size_t n = 0; n <= 67; ++n) lengths.push_back(n);
  for (const std::size_t n : {127, 128, 129, 1000, 4099}) lengths.push_back(n);
  constexpr std::size_t kGuard = 64;
  constexpr unsigned char kFill = 0xA5;
  const auto floats = RandomFloats(8 * 4099, 6);  // f32 inputs that exercise rounding
  std::mt19937_64 rng(7);
  const auto kernels = AllKernels();
  ForEachTarget([&] {
    for (const Kernel& k : kernels) {
      for (const std::size_t n : lengths) {
        for (const std::size_t src_off : {0, 1, 2}) {
          for (const std::size_t dst_off : {0, 1, 2}) {
            std::vector<unsigned char> src(src_off + n * k.in_size + kGuard);
            for (auto& b : src) b = static_cast<unsigned char>(rng());
            if (k.in_size == 4) std::memcpy(src.data() + src_off, floats.data(), n * 4);
            std::vector<unsigned char> dst(kGuard + dst_off + n * k.out_size + kGuard, kFill);
            unsigned char* out = dst.data() + kGuard + dst_off;
            k.run(src.data() + src_off, out, n);

            std::vector<unsigned char> want(k.out_size);
            for (std::size_t i = 0; i < n; ++i) {
              k.ref(src.data() + src_off + i * k.in_size, want.data());
              ASSERT_EQ(std::memcmp(out + i * k.out_size, want.data(), k.out_size), 0)
                  << k.name << " n=" << n << " src+" << src_off << " dst+" << dst_off
                  << " element " << i;
            }
            for (std::size_t i = 0; i < dst.size(); ++i) {
              const bool inside = i >= kGuard + dst_off && i < kGuard + dst_off + n * k.out_size;
              if (!inside) {
                ASSERT_EQ(dst[i], kFill) << k.name << " n=" << n << " wrote outside, byte " << i;
              }
            }
          }
        }
      }
    }
  });
}

// to_f32_minus is to_f32 followed by a float32 subtraction, bit for bit: every bf16 pattern
// against random bases (NaN, Inf and subnormal inputs included), every dtype, tails and odd
// source addresses, on every target.
TEST(ConvertKernels, ToF32MinusIsConvertThenSubtract) {
  const auto all = AllU16();
  const auto bases = RandomFloats(all.size(), 11);
  const auto f32s = RandomFloats(4099, 12);
  std::vector<double> f64s(f32s.begin(), f32s.end());
  ForEachTarget([&] {
    std::vector<float> got(all.size());
    to_f32_minus(DType::BF16, all.data(), bases.data(), got.data(), all.size());
    std::vector<float> want(all.size());
    for (std::size_t i = 0; i < all.size(); ++i) want[i] = bf16_bits_to_f32(all[i]) - bases[i];
    ExpectBitsEqual(got, want, "bf16 minus base");
    for (const std::size_t n : {0, 1, 7, 15, 16, 17, 33, 1000, 4099}) {
      for (const std::size_t off : {0, 1}) {
        struct Source {
          DType dtype;
          const void* bytes;
          std::size_t size;
        };
        for (const Source src : {Source{DType::BF16, all.data(), 2}, Source{DType::F16, all.data(), 2},
                                 Source{DType::F32, f32s.data(), 4}, Source{DType::F64, f64s.data(), 8}}) {
          std::vector<unsigned char> in(off + n * src.size);
          if (n) std::memcpy(in.data() + off, src.bytes, n * src.size);
          std::vector<float> out(n + 1, 123.0f), ref(n);
          to_f32(src.dtype, in.data() + off, ref.data(), n);
          for (std::size_t i = 0; i < n; ++i) ref[i] -= bases[i];
          to_f32_minus(src.dtype, in.data() + off, bases.data(), out.data(), n);
          ASSERT_EQ(out[n], 123.0f) << dtype_name(src.dtype) << " wrote past n=" << n;
          out.resize(n);
          const std::string what = std::string(dtype_name(src.dtype)) + " minus base, n=" + std::to_string(n);
          ExpectBitsEqual(out, ref, what.c_str());
        }
      }
    }
  });
}

#if CONFLUX_TEST_X86
// Kernels must not depend on the floating-point environment: flush-to-zero and
// denormals-are-zero (as set by -ffast-math startup code) change nothing.
TEST(ConvertKernels, IgnoresFlushToZeroAndDenormalsAreZero) {
  const auto all = AllU16();
  std::vector<float> want_f16, in = NarrowingCases(F16Format());
  for (const u16 h : all) want_f16.push_back(f16_bits_to_f32(h));
  const auto want_narrow_f16 = MapRef(in, f32_to_f16_bits);
  const auto want_narrow_bf16 = MapRef(in, f32_to_bf16_bits);
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(csr | 0x8040u);  // FTZ | DAZ
  ForEachTarget([&] {
    std::vector<float> got(all.size());
    f16_to_f32(all.data(), got.data(), all.size());
    ExpectBitsEqual(got, want_f16, "f16->f32 under FTZ/DAZ");
    ExpectBitsEqual(NarrowF16(in), want_narrow_f16, "f32->f16 under FTZ/DAZ");
    ExpectBitsEqual(NarrowBF16(in), want_narrow_bf16, "f32->bf16 under FTZ/DAZ");
  });
  _mm_setcsr(csr);
}
#endif

TEST(ConvertDispatch, ToAndFromF32ByDType) {
  const std::vector<float> values = {1.5f, -0.0f, 65520.0f, 0x1p-20f, 3.0e38f, 1.0f / 3};
  const std::size_t n = values.size();
  for (const DType t : {DType::F16, DType::BF16, DType::F32, DType::F64}) {
    SCOPED_TRACE(std::string(dtype_name(t)));
    std::vector<unsigned char> stored(n * 8), direct(n * 8);
    from_f32(t, values.data(), stored.data(), n);
    switch (t) {
      case DType::F16: f32_to_f16(values.data(), direct.data(), n); break;
      case DType::BF16: f32_to_bf16(values.data(), direct.data(), n); break;
      case DType::F32: f32_to_f32_out(values.data(), direct.data(), n); break;
      default: f32_to_f64(values.data(), direct.data(), n); break;
    }
    EXPECT_EQ(stored, direct);

    std::vector<float> back(n), back_direct(n);
    to_f32(t, stored.data(), back.data(), n);
    switch (t) {
      case DType::F16: f16_to_f32(stored.data(), back_direct.data(), n); break;
      case DType::BF16: bf16_to_f32(stored.data(), back_direct.data(), n); break;
      case DType::F32: f32_to_f32(stored.data(), back_direct.data(), n); break;
      default: f64_to_f32(stored.data(), back_direct.data(), n); break;
    }
    ExpectBitsEqual(back, back_direct, "round trip");
    if (t == DType::F32 || t == DType::F64) ExpectBitsEqual(back, values, "exact round trip");
  }
}

TEST(ConvertDispatch, RejectsNonFloatDTypes) {
  float f = 0;
  unsigned char buf[16] = {};
  for (int i = 0; i < kDTypeCount; ++i) {
    const auto t = static_cast<DType>(i);
    if (t == DType::F16 || t == DType::BF16 || t == DType::F32 || t == DType::F64) continue;
    SCOPED_TRACE(std::string(dtype_name(t)));
    EXPECT_THROW(to_f32(t, buf, &f, 1), std::invalid_argument);
    EXPECT_THROW(from_f32(t, &f, buf, 1), std::invalid_argument);
  }
  EXPECT_THROW(to_f32(DType::I32, nullptr, nullptr, 0), std::invalid_argument);
}

TEST(ConvertDispatch, ZeroLengthAcceptsNullPointers) {
  for (const DType t : {DType::F16, DType::BF16, DType::F32, DType::F64}) {
    to_f32(t, nullptr, nullptr, 0);
    from_f32(t, nullptr, nullptr, 0);
  }
}

TEST(ConvertDispatch, TargetNameIsKnown) {
  const std::string name = convert_target_name();
  EXPECT_FALSE(name.empty());
  EXPECT_NE(name, "Unknown");
  std::printf("[  target  ] %s\n", name.c_str());
}

}  // namespace
}  // namespace conflux
