#ifndef KILN_SERVER_VERSION_H_
#define KILN_SERVER_VERSION_H_
namespace kiln {
inline constexpr char kVersion[] = "0.1.0";
}  // namespace kiln
#endif  // KILN_SERVER_VERSION_H_
