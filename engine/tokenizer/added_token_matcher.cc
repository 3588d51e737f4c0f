#include "engine/tokenizer/added_token_matcher.h"

#include <algorithm>
#include <utility>

namespace kiln::tokenizer {

AddedTokenMatcher::AddedTokenMatcher(std::vector<Token> tokens) : tokens_(std::move(tokens)) {
  for (uint32_t i = 0; i < tokens_.size(); ++i) {
    by_first_byte_[static_cast<uint8_t>(tokens_[i].content[0])].push_back(i);
  }
  for (std::vector<uint32_t>& bucket : by_first_byte_) {
    std::stable_sort(bucket.begin(), bucket.end(), [&](uint32_t a, uint32_t b) {
      return tokens_[a].content.size() > tokens_[b].content.size();
    });
  }
}

AddedTokenMatcher::Match AddedTokenMatcher::Find(absl::string_view text, size_t from) const {
  for (size_t pos = from; pos < text.size(); ++pos) {
    for (uint32_t i : by_first_byte_[static_cast<uint8_t>(text[pos])]) {
      const std::string& content = tokens_[i].content;
      if (text.compare(pos, content.size(), content) == 0) {
        return {pos, content.size(), tokens_[i].id};
      }
    }
  }
  return {};
}

}  // namespace kiln::tokenizer
