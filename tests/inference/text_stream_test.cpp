#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "inference/text_stream.h"

namespace tandem {
namespace {

std::vector<std::string> feed(TextStream& ts, const std::vector<std::string>& pieces) {
  std::vector<std::string> out;
  for (const auto& p : pieces) out.push_back(ts.push(p));
  return out;
}

TEST(TextStream, StopStringAcrossTokensIsCaughtAndNeverShown) {
  TextStream ts({"o w"});
  const auto out = feed(ts, {"hel", "lo", " wo", "rld"});
  EXPECT_EQ(out[0], "hel");
  EXPECT_EQ(out[1], "l") << "'o' could start the stop string";
  EXPECT_EQ(out[2], "") << "the stop string completes: text before it only";
  EXPECT_TRUE(ts.stopped());
  EXPECT_EQ(out[3], "");
  EXPECT_EQ(ts.flush(), "");
}

TEST(TextStream, HeldBackTextIsReleasedWhenTheMatchFails) {
  TextStream ts({"abc"});
  EXPECT_EQ(ts.push("xa"), "x");
  EXPECT_EQ(ts.push("b"), "");
  EXPECT_EQ(ts.push("d"), "abd");
  EXPECT_FALSE(ts.stopped());
  EXPECT_EQ(ts.push("ab"), "");
  EXPECT_EQ(ts.flush(), "ab") << "the end releases what was held";
}

TEST(TextStream, SplitUtf8CharactersAndNulBytesPassThroughWhole) {
  TextStream ts;
  const std::string euro = "\xE2\x82\xAC";
  EXPECT_EQ(ts.push(euro.substr(0, 1)), "");
  EXPECT_EQ(ts.push(euro.substr(1)), euro);
  EXPECT_EQ(ts.push(std::string("a\0b", 3)), std::string("a\0b", 3));
  EXPECT_EQ(ts.push("\xF0\x9F"), "");
  EXPECT_EQ(ts.flush(), "\xF0\x9F") << "bytes are never lost";
}

}  // namespace
}  // namespace tandem
