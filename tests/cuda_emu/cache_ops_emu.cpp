// Emulated runs of cache_ops_kernel.cuh (reshape_and_cache, copy_blocks) through their launchers:
// byte moves, so the reference is the same scatter / block copy done on the host and compared
// exactly. Row sizes are chosen so every copy unit (16, 8, 4, 2 bytes) is used; pools are K/V views
// of one interleaved [num_blocks, 2, block_size, heads, head_dim] buffer or separate buffers.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "emu_check.h"
#include "kv_paged/cache_ops_kernel.cuh"

namespace kvemu {
namespace {

using kv_paged::CacheLayout;

struct Pools {
  std::vector<uint8_t> bytes;
  CacheLayout k, v;  // strides in elements
  size_t v_offset;   // elements from the start of bytes to V's first element
};

Pools make_pools(std::mt19937& rng, int64_t nb, int64_t bs, int64_t heads, int64_t d, int es,
                 bool interleaved) {
  Pools p;
  const int64_t row = heads * d, block = bs * row;
  p.bytes.resize(size_t(2 * nb * block * es));
  for (auto& b : p.bytes) b = uint8_t(rng());
  CacheLayout l{nb, bs, heads, d, interleaved ? 2 * block : block, row, d};
  p.k = p.v = l;
  p.v_offset = size_t(interleaved ? block : nb * block);
  return p;
}

// debug: a slot past the pool for token 4 must reach the error sink; the other tokens are written.
void reshape_and_cache_case(std::mt19937& rng, int es, int64_t heads, int64_t d, int64_t bs,
                            bool interleaved, int64_t pad, bool debug = false) {
  const int64_t nb = 5, tokens = 9;
  Pools pools = make_pools(rng, nb, bs, heads, d, es, interleaved);
  const int64_t stride_token = heads * d + pad;  // padded rows: a strided key/value view
  std::vector<uint8_t> key(size_t(tokens * stride_token * es)), value(key.size());
  for (auto& b : key) b = uint8_t(rng());
  for (auto& b : value) b = uint8_t(rng());
  std::vector<int64_t> slots(size_t(nb * bs));
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  std::vector<int64_t> mapping(slots.begin(), slots.begin() + tokens);
  mapping[2] = mapping[6] = -1;  // padding tokens are skipped
  if (debug) mapping[4] = nb * bs + 7;

  std::vector<uint8_t> expect = pools.bytes;
  for (int64_t t = 0; t < tokens; ++t) {
    if (mapping[t] < 0 || mapping[t] >= nb * bs) continue;
    const int64_t blk = mapping[t] / bs, off = mapping[t] % bs;
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t dst = blk * pools.k.stride_block + off * pools.k.stride_slot + h * d;
      std::memcpy(&expect[size_t(dst * es)], &key[size_t((t * stride_token + h * d) * es)], size_t(d * es));
      std::memcpy(&expect[size_t((pools.v_offset + dst) * es)],
                  &value[size_t((t * stride_token + h * d) * es)], size_t(d * es));
    }
  }
  kv_paged::ReshapeAndCacheCudaParams cp;
  auto& b = cp.base;
  b.key = key.data();
  b.value = value.data();
  b.k_cache = pools.bytes.data();
  b.v_cache = pools.bytes.data() + pools.v_offset * es;
  b.slot_mapping = mapping.data();
  b.num_tokens = tokens;
  b.key_stride_token = b.value_stride_token = stride_token;
  b.key_stride_head = b.value_stride_head = d;
  b.k_layout = pools.k;
  b.v_layout = pools.v;
  cp.elem_bytes = es;
  std::vector<int64_t> sink(4, 0);
  if (debug) cp.error_sink = sink.data();
  const cudaError_t err = kv_paged::launch_reshape_and_cache(cp, nullptr);
  const bool sink_ok = !debug || (sink[0] == kv_paged::cuda::kBadSlot && sink[1] == 4 &&
                                  sink[3] == nb * bs + 7);
  const std::string name = "reshape_and_cache es=" + std::to_string(es) + " heads=" +
                           std::to_string(heads) + " d=" + std::to_string(d) + " bs=" +
                           std::to_string(bs) + (interleaved ? " interleaved" : "") + " pad=" +
                           std::to_string(pad) + (debug ? " bad slot -> error sink" : "");
  tally().record(name, err == cudaSuccess && pools.bytes == expect && sink_ok,
                 err != cudaSuccess ? "launch failed"
                 : !sink_ok         ? "error sink not set as expected"
                                    : "pool bytes differ");
}

void copy_blocks_case(std::mt19937& rng, int es, int64_t heads, int64_t d, int64_t bs, int layers,
                      bool interleaved) {
  const int64_t nb = 7;
  std::vector<Pools> pools;
  for (int l = 0; l < layers; ++l) pools.push_back(make_pools(rng, nb, bs, heads, d, es, interleaved));
  // Copy-on-write pairs: sources are never destinations.
  const std::vector<int64_t> mapping = {0, 3, 1, 5, 0, 6, 2, 4};
  std::vector<std::vector<uint8_t>> expect;
  for (auto& p : pools) {
    std::vector<uint8_t> e = p.bytes;
    for (size_t i = 0; i < mapping.size(); i += 2) {
      for (size_t base : {size_t(0), p.v_offset}) {
        for (int64_t s = 0; s < bs; ++s) {
          const size_t src = base + size_t(mapping[i] * p.k.stride_block + s * p.k.stride_slot);
          const size_t dst = base + size_t(mapping[i + 1] * p.k.stride_block + s * p.k.stride_slot);
          std::memcpy(&e[dst * es], &p.bytes[src * es], size_t(heads * d * es));
        }
      }
    }
    expect.push_back(std::move(e));
  }
  kv_paged::CopyBlocksCudaParams cp;
  cp.block_mapping = mapping.data();
  cp.num_pairs = int64_t(mapping.size() / 2);
  cp.num_blocks = nb;
  cp.num_tensors = 2 * layers;
  for (int l = 0; l < layers; ++l) {
    cp.base[2 * l] = pools[l].bytes.data();
    cp.base[2 * l + 1] = pools[l].bytes.data() + pools[l].v_offset * es;
  }
  for (int kv = 0; kv < 2; ++kv) {
    const CacheLayout& L = pools[0].k;
    cp.layout[kv] = {L.stride_block * es, L.stride_slot * es, L.stride_head * es, bs, heads, d * es};
  }
  const cudaError_t err = kv_paged::launch_copy_blocks(cp, nullptr);
  bool ok = err == cudaSuccess;
  for (int l = 0; l < layers; ++l) ok = ok && pools[l].bytes == expect[l];
  tally().record("copy_blocks es=" + std::to_string(es) + " heads=" + std::to_string(heads) +
                     " d=" + std::to_string(d) + " bs=" + std::to_string(bs) + " layers=" +
                     std::to_string(layers) + (interleaved ? " interleaved" : ""),
                 ok, err != cudaSuccess ? "launch failed" : "pool bytes differ");
}

}  // namespace

// cuda_utils.cuh's chunk accesses under g++'s type-based alias analysis (run_emu.sh builds with
// -fstrict-aliasing): a store of a 4-byte chunk over a float, or a float store after a chunk load,
// must be seen. Through a plain uint32_t* the compiler may keep the float in a register (g++ -O1
// -fstrict-aliasing returns 1.0 from the first probe), which is what MayAlias rules out.
__attribute__((noinline)) float chunk_store_probe(float* f, float* same) {
  *f = 1.f;
  kv_paged::cuda::store_chunk(same, uint32_t{0x40000000u});  // 2.0f
  return *f;
}
__attribute__((noinline)) uint32_t chunk_load_probe(float* f) {
  *f = 1.f;
  const uint32_t bits = kv_paged::cuda::load_chunk<uint32_t>(f);
  *f = 2.f;
  return bits;
}

void chunk_alias_case() {
  float x = 0.f;
  const float stored = chunk_store_probe(&x, &x);
  const uint32_t loaded = chunk_load_probe(&x);
  char detail[96];
  std::snprintf(detail, sizeof(detail), "store probe read %g (want 2), load probe 0x%08x (want "
                "0x3f800000)", stored, loaded);
  tally().record("chunk accesses under strict aliasing", stored == 2.f && loaded == 0x3f800000u,
                 detail);
}

void run_cache_ops_cases() {
  std::mt19937 rng(15);
  chunk_alias_case();
  // Row bytes 128 (unit 16), 8 (unit 8), 12 (unit 4), 6 (unit 2); f32 rows of 256 bytes.
  reshape_and_cache_case(rng, 2, 2, 64, 4, false, 0);
  reshape_and_cache_case(rng, 2, 3, 4, 3, true, 0);
  reshape_and_cache_case(rng, 2, 2, 6, 2, false, 0);
  reshape_and_cache_case(rng, 2, 1, 3, 5, true, 1);
  reshape_and_cache_case(rng, 4, 2, 64, 2, true, 4);
  reshape_and_cache_case(rng, 2, 8, 128, 2, false, 0);  // 2 KB rows: more units than threads
  reshape_and_cache_case(rng, 2, 2, 8, 4, false, 0, /*debug=*/true);
  copy_blocks_case(rng, 2, 2, 64, 4, 2, false);
  copy_blocks_case(rng, 2, 3, 6, 3, 3, true);
  copy_blocks_case(rng, 4, 1, 3, 16, 1, true);
  copy_blocks_case(rng, 2, 8, 128, 2, 2, false);
}

}  // namespace kvemu
