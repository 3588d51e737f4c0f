// The server parses requests through the lenient wire messages of
// kiln_wire.proto (see proto/lenient_request_traits.h); a field of the public
// message missing there would be dropped without a word. These tests pin
// that every public request field has a wire twin with the same number and
// a compatible type, and that the traits carry every field across.
#include <grpcpp/impl/codegen/proto_utils.h>

#include <string>

#include "gtest/gtest.h"
#include "kiln/v1/kiln.pb.h"
#include "kiln/v1/kiln_wire.pb.h"

namespace kiln {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;

// Same wire type: strings may be bytes and enums int32 on the wire side.
bool Compatible(const FieldDescriptor* pub, const FieldDescriptor* wire) {
  auto norm = [](FieldDescriptor::Type t) {
    if (t == FieldDescriptor::TYPE_STRING) return FieldDescriptor::TYPE_BYTES;
    if (t == FieldDescriptor::TYPE_ENUM) return FieldDescriptor::TYPE_INT32;
    return t;
  };
  return norm(pub->type()) == norm(wire->type()) && pub->is_repeated() == wire->is_repeated();
}

void ExpectTwin(const Descriptor* pub, const Descriptor* wire) {
  for (int i = 0; i < pub->field_count(); ++i) {
    const FieldDescriptor* f = pub->field(i);
    const FieldDescriptor* w = wire->FindFieldByNumber(f->number());
    ASSERT_NE(w, nullptr) << pub->full_name() << "." << f->name() << " (" << f->number()
                          << ") is missing from " << wire->full_name();
    EXPECT_EQ(w->name(), f->name()) << pub->full_name();
    EXPECT_TRUE(Compatible(f, w)) << pub->full_name() << "." << f->name();
    EXPECT_EQ(w->has_presence(), f->has_presence()) << pub->full_name() << "." << f->name();
  }
}

TEST(WireTest, EveryPublicRequestFieldHasAWireTwin) {
  ExpectTwin(v1::EmbedRequest::descriptor(), v1::wire::EmbedRequestWire::descriptor());
  ExpectTwin(v1::BrickRef::descriptor(), v1::wire::BrickRefWire::descriptor());
  ExpectTwin(v1::TokenizeRequest::descriptor(), v1::wire::TokenizeRequestWire::descriptor());
  ExpectTwin(v1::RouteRequest::descriptor(), v1::wire::RouteRequestWire::descriptor());
}

template <typename T>
T RoundTrip(const T& in) {
  grpc::ByteBuffer buffer;
  bool own = false;
  EXPECT_TRUE(grpc::SerializationTraits<T>::Serialize(in, &buffer, &own).ok());
  T out;
  EXPECT_TRUE(grpc::SerializationTraits<T>::Deserialize(&buffer, &out).ok());
  return out;
}

TEST(WireTest, TraitsCarryEveryEmbedAndRouteField) {
  v1::EmbedRequest in;
  std::string input = "an input";
  in.add_inputs(input);
  in.set_instruction("Find code:");
  in.set_exit_layer(2);
  in.set_normalize(false);
  in.set_truncate(false);
  v1::BrickRef* b = in.add_bricks();
  b->set_id("py");
  b->set_version(3);
  b->set_weight(0.5f);
  in.set_routing(v1::ROUTING_NONE);
  in.set_ffn_fraction(0.25f);
  const v1::EmbedRequest out = RoundTrip(in);
  EXPECT_EQ(out.SerializeAsString(), in.SerializeAsString()) << out.DebugString();
  // An enum value this build does not know survives to the service's check.
  in.set_routing(static_cast<v1::Routing>(17));
  EXPECT_EQ(static_cast<int>(RoundTrip(in).routing()), 17);

  v1::RouteRequest route;
  route.set_instruction("Find code:");
  EXPECT_EQ(RoundTrip(route).instruction(), "Find code:");
}

}  // namespace
}  // namespace kiln
