#include "engine/tokenizer/bpe_model.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/byte_level.h"

namespace kiln::tokenizer {
namespace {

using Merge = BpeModel::Scratch::Merge;

// Orders the heap so that its front is the lowest rank, then the leftmost
// position: the library's min-heap on (rank, pos).
bool HeapLess(const Merge& a, const Merge& b) {
  if (a.rank != b.rank) return a.rank > b.rank;
  return a.pos > b.pos;
}

}  // namespace

absl::StatusOr<BpeModel> BpeModel::Create(
    absl::flat_hash_map<std::string, int32_t> vocab,
    const std::vector<std::pair<std::string, std::string>>& merges, BpeModelOptions options) {
  BpeModel model;
  model.vocab_ = std::move(vocab);
  auto id_of = [&](const std::string& token, size_t i) -> absl::StatusOr<int32_t> {
    auto it = model.vocab_.find(token);
    if (it == model.vocab_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.merges[", i, "]: \"", token, "\" is not in model.vocab"));
    }
    return it->second;
  };
  model.merges_.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const auto& [left, right] = merges[i];
    absl::StatusOr<int32_t> left_id = id_of(left, i);
    if (!left_id.ok()) return left_id.status();
    absl::StatusOr<int32_t> right_id = id_of(right, i);
    if (!right_id.ok()) return right_id.status();
    auto merged = model.vocab_.find(absl::StrCat(left, right));
    if (merged == model.vocab_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("model.merges[", i, "]: the merged token \"",
                                                     left, right, "\" is not in model.vocab"));
    }
    model.merges_.insert_or_assign(PairKey(*left_id, *right_id),
                                   MergeTarget{static_cast<int32_t>(i), merged->second});
  }
  if (options.unk_token.has_value()) {
    auto it = model.vocab_.find(*options.unk_token);
    if (it == model.vocab_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.unk_token \"", *options.unk_token, "\" is not in model.vocab"));
    }
    model.unk_id_ = it->second;
  }
  for (int b = 0; b < 256; ++b) {
    auto it = model.vocab_.find(ByteToCharUtf8(static_cast<uint8_t>(b)));
    model.byte_ids_[b] = it == model.vocab_.end() ? -1 : it->second;
  }
  model.fuse_unk_ = options.fuse_unk;
  model.ignore_merges_ = options.ignore_merges;
  return model;
}

const BpeModel::MergeTarget* BpeModel::FindMerge(int32_t left, int32_t right) const {
  auto it = merges_.find(PairKey(left, right));
  return it == merges_.end() ? nullptr : &it->second;
}

void BpeModel::InitSymbols(absl::string_view word, Scratch* scratch) const {
  std::vector<Scratch::Symbol>& symbols = scratch->symbols;
  symbols.clear();
  auto add = [&](int32_t id) {
    const int32_t n = static_cast<int32_t>(symbols.size());
    if (n > 0) symbols.back().next = n;
    symbols.push_back({id, n - 1, -1, false});
  };
  bool pending_unk = false;  // an unk not yet added (the library's `unk` slot)
  for (char c : word) {
    const int32_t id = byte_ids_[static_cast<uint8_t>(c)];
    if (id >= 0) {
      if (pending_unk) add(unk_id_);
      pending_unk = false;
      add(id);
    } else if (unk_id_ >= 0) {
      if (pending_unk && !fuse_unk_) add(unk_id_);
      pending_unk = true;
    }
  }
  if (pending_unk) add(unk_id_);
}

void BpeModel::Tokenize(absl::string_view word, Scratch* scratch, std::vector<int32_t>* ids) const {
  if (ignore_merges_) {
    scratch->word.clear();
    AppendByteLevel(word, &scratch->word);
    auto it = vocab_.find(scratch->word);
    if (it != vocab_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  InitSymbols(word, scratch);
  std::vector<Scratch::Symbol>& symbols = scratch->symbols;
  if (symbols.size() > 1) {
    std::vector<Merge>& heap = scratch->heap;
    heap.clear();
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      if (const MergeTarget* m = FindMerge(symbols[i].id, symbols[i + 1].id)) {
        heap.push_back({m->rank, static_cast<int32_t>(i), m->new_id});
      }
    }
    std::make_heap(heap.begin(), heap.end(), HeapLess);
    // The library's Word::merge_all without dropout, step for step: entries
    // made stale by earlier merges are skipped when popped.
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), HeapLess);
      const Merge top = heap.back();
      heap.pop_back();
      Scratch::Symbol& cur = symbols[top.pos];
      if (cur.removed || cur.next < 0) continue;
      const int32_t right_pos = cur.next;
      const Scratch::Symbol right = symbols[right_pos];
      const MergeTarget* m = FindMerge(cur.id, right.id);
      if (m == nullptr || m->new_id != top.new_id) continue;
      cur.id = top.new_id;
      cur.next = right.next;
      symbols[right_pos].removed = true;
      if (right.next >= 0) symbols[right.next].prev = top.pos;
      if (cur.prev >= 0) {
        if (const MergeTarget* left = FindMerge(symbols[cur.prev].id, cur.id)) {
          heap.push_back({left->rank, cur.prev, left->new_id});
          std::push_heap(heap.begin(), heap.end(), HeapLess);
        }
      }
      if (cur.next >= 0) {
        if (const MergeTarget* next = FindMerge(cur.id, symbols[cur.next].id)) {
          heap.push_back({next->rank, top.pos, next->new_id});
          std::push_heap(heap.begin(), heap.end(), HeapLess);
        }
      }
    }
  }
  for (const Scratch::Symbol& s : symbols) {
    if (!s.removed) ids->push_back(s.id);
  }
}

std::optional<int32_t> BpeModel::TokenToId(absl::string_view token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

}  // namespace kiln::tokenizer
