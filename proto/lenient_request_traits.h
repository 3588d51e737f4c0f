// gRPC serialization traits for Kiln's request messages that parse their
// string fields without protobuf's UTF-8 check (see kiln_wire.proto for
// why). Serialization is the stock protobuf one. Force-included (-include)
// into every translation unit that links kiln_proto, so every use of
// SerializationTraits<EmbedRequest> sees this specialization (one definition).
#ifndef KILN_PROTO_LENIENT_REQUEST_TRAITS_H_
#define KILN_PROTO_LENIENT_REQUEST_TRAITS_H_

#include <grpcpp/impl/codegen/proto_utils.h>

#include "kiln/v1/kiln.pb.h"
#include "kiln/v1/kiln_wire.pb.h"

namespace grpc {

template <>
class SerializationTraits<kiln::v1::EmbedRequest, void> {
 public:
  static Status Serialize(const protobuf::MessageLite& msg, ByteBuffer* bb, bool* own_buffer) {
    return GenericSerialize<ProtoBufferWriter, kiln::v1::EmbedRequest>(msg, bb, own_buffer);
  }
  static Status Deserialize(ByteBuffer* buffer, protobuf::MessageLite* msg) {
    kiln::v1::wire::EmbedRequestWire wire;
    Status st = GenericDeserialize<ProtoBufferReader, kiln::v1::wire::EmbedRequestWire>(buffer, &wire);
    if (!st.ok()) return st;
    auto* out = static_cast<kiln::v1::EmbedRequest*>(msg);
    out->Clear();
    // Setters do not check UTF-8; the service validates each input.
    for (std::string& s : *wire.mutable_inputs()) out->add_inputs(std::move(s));
    out->set_instruction(std::move(*wire.mutable_instruction()));
    out->set_exit_layer(wire.exit_layer());
    if (wire.has_normalize()) out->set_normalize(wire.normalize());
    if (wire.has_truncate()) out->set_truncate(wire.truncate());
    for (kiln::v1::wire::BrickRefWire& b : *wire.mutable_bricks()) {
      kiln::v1::BrickRef* ref = out->add_bricks();
      ref->set_id(std::move(*b.mutable_id()));
      ref->set_version(b.version());
      if (b.has_weight()) ref->set_weight(b.weight());
    }
    out->set_routing(static_cast<kiln::v1::Routing>(wire.routing()));
    if (wire.has_ffn_fraction()) out->set_ffn_fraction(wire.ffn_fraction());
    return st;
  }
};

template <>
class SerializationTraits<kiln::v1::RouteRequest, void> {
 public:
  static Status Serialize(const protobuf::MessageLite& msg, ByteBuffer* bb, bool* own_buffer) {
    return GenericSerialize<ProtoBufferWriter, kiln::v1::RouteRequest>(msg, bb, own_buffer);
  }
  static Status Deserialize(ByteBuffer* buffer, protobuf::MessageLite* msg) {
    kiln::v1::wire::RouteRequestWire wire;
    Status st =
        GenericDeserialize<ProtoBufferReader, kiln::v1::wire::RouteRequestWire>(buffer, &wire);
    if (!st.ok()) return st;
    auto* out = static_cast<kiln::v1::RouteRequest*>(msg);
    out->Clear();
    out->set_instruction(std::move(*wire.mutable_instruction()));
    return st;
  }
};

template <>
class SerializationTraits<kiln::v1::TokenizeRequest, void> {
 public:
  static Status Serialize(const protobuf::MessageLite& msg, ByteBuffer* bb, bool* own_buffer) {
    return GenericSerialize<ProtoBufferWriter, kiln::v1::TokenizeRequest>(msg, bb, own_buffer);
  }
  static Status Deserialize(ByteBuffer* buffer, protobuf::MessageLite* msg) {
    kiln::v1::wire::TokenizeRequestWire wire;
    Status st =
        GenericDeserialize<ProtoBufferReader, kiln::v1::wire::TokenizeRequestWire>(buffer, &wire);
    if (!st.ok()) return st;
    auto* out = static_cast<kiln::v1::TokenizeRequest*>(msg);
    out->Clear();
    for (std::string& s : *wire.mutable_inputs()) out->add_inputs(std::move(s));
    out->set_instruction(std::move(*wire.mutable_instruction()));
    if (wire.has_truncate()) out->set_truncate(wire.truncate());
    return st;
  }
};

}  // namespace grpc

#endif  // KILN_PROTO_LENIENT_REQUEST_TRAITS_H_
