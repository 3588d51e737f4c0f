#include "router/brick_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <system_error>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;  // keeps a rewritten brick.json's field order

constexpr const char* kBrickFiles[] = {kLoraConfigFile, kLoraWeightsFile, kBrickManifestFile};

std::string BrickName(absl::string_view id) { return absl::StrCat("brick \"", id, "\""); }
std::string BrickName(absl::string_view id, int version) {
  return absl::StrCat("brick \"", id, "\" version ", version);
}

// A version folder name: a positive decimal integer without leading zeros
// that fits in an int.
std::optional<int> ParseVersionName(absl::string_view name) {
  if (name.empty() || name.size() > 10 || name[0] < '1' || name[0] > '9') return std::nullopt;
  if (!std::all_of(name.begin(), name.end(), absl::ascii_isdigit)) return std::nullopt;
  int64_t v = 0;
  if (!absl::SimpleAtoi(name, &v) || v > std::numeric_limits<int>::max()) return std::nullopt;
  return static_cast<int>(v);
}

// True if the canonical path `p` is `root` or lies below it (component-wise,
// so "/a/bc" is not inside "/a/b").
bool IsWithin(const fs::path& p, const fs::path& root) {
  auto [r, q] = std::mismatch(root.begin(), root.end(), p.begin(), p.end());
  return r == root.end();
}

absl::Status ErrnoStatus(int err, absl::string_view what, const fs::path& path) {
  return absl::ErrnoToStatus(err, absl::StrCat(what, " ", path.string()));
}

absl::Status FsStatus(const std::error_code& ec, absl::string_view what, const fs::path& path) {
  return absl::ErrnoToStatus(ec.value(), absl::StrCat(what, " ", path.string()));
}

absl::StatusOr<std::string> ReadWholeFile(const fs::path& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (!fs::exists(st)) return absl::NotFoundError(absl::StrCat(path.string(), ": file not found"));
  if (!fs::is_regular_file(st)) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a regular file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::PermissionDeniedError(absl::StrCat(path.string(), ": cannot open"));
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path.string(), ": read error"));
  return std::move(buf).str();
}

// Creates `path` (which must not exist), writes `bytes` and fsyncs it.
absl::Status WriteNewFile(const fs::path& path, absl::string_view bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus(errno, "cannot create", path);
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return ErrnoStatus(err, "cannot write", path);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    return ErrnoStatus(err, "cannot fsync", path);
  }
  if (::close(fd) != 0) return ErrnoStatus(errno, "cannot close", path);
  return absl::OkStatus();
}

// Makes a rename or creation inside `dir` durable. Best effort: a failure is
// logged, not returned, since the change itself has already happened.
void SyncDir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0 || ::fsync(fd) != 0) {
    KLOG(WARNING) << "brick store: cannot fsync directory " << dir.string() << ": "
                  << std::strerror(errno);
  }
  if (fd >= 0) ::close(fd);
}

// A name no other call (in this or another process) uses at the same time.
std::string UniqueSuffix() {
  static std::atomic<uint64_t> counter{0};
  const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
  return absl::StrCat(::getpid(), "-", counter.fetch_add(1), "-", now);
}

// Renames `from` to `to` unless `to` exists (atomically where the file system
// supports RENAME_NOREPLACE). EEXIST / ENOTEMPTY come back as ALREADY_EXISTS.
absl::Status RenameNoReplace(const fs::path& from, const fs::path& to, absl::string_view name) {
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0) {
    return absl::OkStatus();
  }
  int err = errno;
  if (err == EINVAL || err == ENOSYS) {
    // No RENAME_NOREPLACE here. Register holds write_mu_, so only another
    // process could slip in between this check and the rename.
    std::error_code ec;
    if (fs::exists(fs::symlink_status(to, ec))) {
      err = EEXIST;
    } else if (::rename(from.c_str(), to.c_str()) == 0) {
      return absl::OkStatus();
    } else {
      err = errno;
    }
  }
  if (err == EEXIST || err == ENOTEMPTY) {
    return absl::AlreadyExistsError(absl::StrCat(name, " already exists"));
  }
  return ErrnoStatus(err, absl::StrCat("cannot publish ", name, " as"), to);
}

// Rewrites the paths of a temporary folder in an error message to `label`, so
// that a caller reads "upload/brick.json: ..." rather than a hidden folder.
absl::Status Relabel(const absl::Status& s, const std::string& tmp_dir, const std::string& label) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrReplaceAll(s.message(), {{tmp_dir, label}}));
}

}  // namespace

// The three files of a version to publish.
struct BrickStore::Source {
  std::string label;  // names the source in messages ("upload", or the folder)
  absl::string_view adapter_config;
  absl::string_view adapter_weights;
  absl::string_view manifest;
};

absl::StatusOr<std::unique_ptr<BrickStore>> BrickStore::Open(const std::string& root) {
  std::error_code ec;
  const fs::file_status st = fs::status(root, ec);
  if (!fs::exists(st)) {
    return absl::NotFoundError(absl::StrCat("brick store root \"", root, "\" does not exist"));
  }
  if (!fs::is_directory(st)) {
    return absl::InvalidArgumentError(
        absl::StrCat("brick store root \"", root, "\" is not a directory"));
  }
  const fs::path canonical = fs::canonical(root, ec);
  if (ec) return FsStatus(ec, "cannot resolve brick store root", root);
  return std::unique_ptr<BrickStore>(new BrickStore(canonical.string()));
}

absl::Status BrickStore::ValidateBrickId(absl::string_view id) {
  if (IsValidBrickId(id)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("invalid brick id \"", absl::CEscape(id),
                                                 "\": must match [a-z0-9][a-z0-9._-]{0,63}"));
}

absl::Status BrickStore::CheckContained(const std::string& path, absl::string_view what) const {
  std::error_code ec;
  const fs::file_status link = fs::symlink_status(path, ec);
  if (!fs::exists(link)) return absl::OkStatus();
  const fs::path canonical = fs::canonical(path, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, ": ", path, " cannot be resolved (", ec.message(), ")"));
  }
  if (!IsWithin(canonical, fs::path(root_))) {
    return absl::FailedPreconditionError(absl::StrCat(what, ": ", path, " resolves to ",
                                                      canonical.string(),
                                                      ", outside the brick store ", root_));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> BrickStore::IdDir(absl::string_view id) const {
  RETURN_IF_ERROR(ValidateBrickId(id));
  std::string dir = (fs::path(root_) / std::string(id)).string();
  RETURN_IF_ERROR(CheckContained(dir, BrickName(id)));
  return dir;
}

std::vector<int> BrickStore::CountedVersions(const std::string& id_dir) const {
  std::vector<int> versions;
  std::error_code ec;
  for (fs::directory_iterator it(id_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::optional<int> v = ParseVersionName(it->path().filename().string());
    if (!v.has_value()) continue;
    const fs::path manifest = it->path() / kBrickManifestFile;
    std::error_code ec2;
    if (!fs::is_directory(it->path(), ec2) || !fs::is_regular_file(manifest, ec2)) continue;
    if (!CheckContained(it->path().string(), "").ok() ||
        !CheckContained(manifest.string(), "").ok()) {
      continue;
    }
    versions.push_back(*v);
  }
  std::sort(versions.begin(), versions.end());
  return versions;
}

absl::StatusOr<std::vector<int>> BrickStore::Versions(absl::string_view id) const {
  ASSIGN_OR_RETURN(const std::string id_dir, IdDir(id));
  return CountedVersions(id_dir);
}

std::vector<BrickStore::Entry> BrickStore::List() const {
  std::vector<Entry> entries;
  std::error_code ec;
  for (fs::directory_iterator it(root_, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::error_code ec2;
    if (!IsValidBrickId(name) || !fs::is_directory(it->path(), ec2)) continue;
    if (!CheckContained(it->path().string(), "").ok()) continue;
    std::vector<int> versions = CountedVersions(it->path().string());
    if (!versions.empty()) entries.push_back(Entry{name, std::move(versions)});
  }
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.id < b.id; });
  return entries;
}

absl::StatusOr<std::pair<std::string, int>> BrickStore::VersionDir(
    absl::string_view id, std::optional<int> version) const {
  ASSIGN_OR_RETURN(const std::string id_dir, IdDir(id));
  int v = 0;
  if (version.has_value()) {
    if (*version < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(BrickName(id), ": version must be a positive integer, got ", *version));
    }
    v = *version;
    std::error_code ec;
    if (!fs::is_directory(id_dir, ec)) {
      return absl::NotFoundError(absl::StrCat(BrickName(id), " not found"));
    }
  } else {
    const std::vector<int> versions = CountedVersions(id_dir);
    if (versions.empty()) return absl::NotFoundError(absl::StrCat(BrickName(id), " not found"));
    v = versions.back();
  }
  const fs::path dir = fs::path(id_dir) / std::to_string(v);
  RETURN_IF_ERROR(CheckContained(dir.string(), BrickName(id, v)));
  std::error_code ec;
  if (!fs::is_regular_file(dir / kBrickManifestFile, ec)) {
    return absl::NotFoundError(absl::StrCat(BrickName(id, v), " not found"));
  }
  RETURN_IF_ERROR(CheckContained((dir / kBrickManifestFile).string(), BrickName(id, v)));
  return std::make_pair(dir.string(), v);
}

absl::StatusOr<BrickVersion> BrickStore::Resolve(absl::string_view id,
                                                 std::optional<int> version) const {
  ASSIGN_OR_RETURN(const auto found, VersionDir(id, version));
  const fs::path dir(found.first);
  for (const char* file : kBrickFiles) {
    RETURN_IF_ERROR(CheckContained((dir / file).string(), BrickName(id, found.second)));
  }
  return ReadBrickVersion(found.first, id, found.second);
}

absl::StatusOr<BrickManifest> BrickStore::ReadManifest(absl::string_view id, int version) const {
  ASSIGN_OR_RETURN(const auto found, VersionDir(id, version));
  const std::string path = absl::StrCat(found.first, "/", kBrickManifestFile);
  ASSIGN_OR_RETURN(BrickManifest manifest, ReadBrickManifest(path));
  if (manifest.id != id || manifest.version != found.second) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": names ", manifest.id, "@",
                                                   manifest.version, ", but its folder is ",
                                                   BrickName(id, found.second)));
  }
  return manifest;
}

absl::StatusOr<BrickVersion> BrickStore::Register(absl::string_view id, std::optional<int> version,
                                                  const std::string& source_dir) {
  std::error_code ec;
  if (!fs::is_directory(source_dir, ec)) {
    return absl::NotFoundError(absl::StrCat("brick source folder ", source_dir, " not found"));
  }
  const fs::path src(source_dir);
  ASSIGN_OR_RETURN(const std::string config, ReadWholeFile(src / kLoraConfigFile));
  ASSIGN_OR_RETURN(const std::string weights, ReadWholeFile(src / kLoraWeightsFile));
  ASSIGN_OR_RETURN(const std::string manifest, ReadWholeFile(src / kBrickManifestFile));
  return Publish(id, version, Source{source_dir, config, weights, manifest});
}

absl::StatusOr<BrickVersion> BrickStore::RegisterBytes(absl::string_view id,
                                                       std::optional<int> version,
                                                       absl::string_view adapter_config_json,
                                                       absl::string_view adapter_safetensors,
                                                       absl::string_view manifest_json) {
  return Publish(id, version,
                 Source{"upload", adapter_config_json, adapter_safetensors, manifest_json});
}

absl::StatusOr<BrickVersion> BrickStore::Publish(absl::string_view id, std::optional<int> version,
                                                 const Source& source) {
  RETURN_IF_ERROR(ValidateBrickId(id));
  if (version.has_value() && *version < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(BrickName(id), ": version must be a positive integer, got ", *version));
  }
  const std::string manifest_label = absl::StrCat(source.label, "/", kBrickManifestFile);
  Json manifest = Json::parse(source.manifest.begin(), source.manifest.end(), nullptr,
                              /*allow_exceptions=*/false);
  if (manifest.is_discarded() || !manifest.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(manifest_label, ": not a JSON object"));
  }

  absl::MutexLock lock(&write_mu_);
  ASSIGN_OR_RETURN(const std::string id_dir_str, IdDir(id));
  const fs::path id_dir(id_dir_str);
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(id_dir, ec))) {
    if (!fs::create_directory(id_dir, ec) && ec) return FsStatus(ec, "cannot create", id_dir);
  } else if (!fs::is_directory(id_dir, ec)) {
    return absl::FailedPreconditionError(
        absl::StrCat(BrickName(id), ": ", id_dir.string(), " exists and is not a directory"));
  }

  int v = 0;
  if (version.has_value()) {
    v = *version;
  } else {
    // One above every version folder present, counted or not.
    int highest = 0;
    for (fs::directory_iterator it(id_dir, ec), end; !ec && it != end; it.increment(ec)) {
      highest = std::max(highest, ParseVersionName(it->path().filename().string()).value_or(0));
    }
    if (ec) return FsStatus(ec, "cannot list", id_dir);
    if (highest == std::numeric_limits<int>::max()) {
      return absl::FailedPreconditionError(
          absl::StrCat(BrickName(id), ": no version number left above ", highest));
    }
    v = highest + 1;
  }
  const fs::path final_dir = id_dir / std::to_string(v);
  if (fs::exists(fs::symlink_status(final_dir, ec))) {
    return absl::AlreadyExistsError(absl::StrCat(BrickName(id, v), " already exists"));
  }

  manifest["id"] = std::string(id);
  manifest["version"] = v;
  const std::string manifest_text = manifest.dump(2) + "\n";

  const fs::path tmp = id_dir / absl::StrCat(".tmp-", v, "-", UniqueSuffix());
  if (!fs::create_directory(tmp, ec)) return FsStatus(ec, "cannot create", tmp);
  absl::StatusOr<BrickVersion> result = [&]() -> absl::StatusOr<BrickVersion> {
    // brick.json last, as an outside writer would: the folder is not a
    // version until then (and not visible at all until the rename).
    RETURN_IF_ERROR(WriteNewFile(tmp / kLoraConfigFile, source.adapter_config));
    RETURN_IF_ERROR(WriteNewFile(tmp / kLoraWeightsFile, source.adapter_weights));
    RETURN_IF_ERROR(WriteNewFile(tmp / kBrickManifestFile, manifest_text));
    absl::StatusOr<BrickVersion> checked = ReadBrickVersion(tmp.string(), id, v);
    if (!checked.ok()) return Relabel(checked.status(), tmp.string(), source.label);
    SyncDir(tmp);
    RETURN_IF_ERROR(RenameNoReplace(tmp, final_dir, BrickName(id, v)));
    SyncDir(id_dir);
    checked->dir = final_dir.string();
    return checked;
  }();
  if (result.ok()) {
    KLOG(INFO) << "brick store: published " << BrickName(id, v);
  } else {
    fs::remove_all(tmp, ec);
  }
  return result;
}

absl::Status BrickStore::Delete(absl::string_view id, int version) {
  RETURN_IF_ERROR(ValidateBrickId(id));
  if (version < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(BrickName(id), ": version must be a positive integer, got ", version));
  }
  absl::MutexLock lock(&write_mu_);
  ASSIGN_OR_RETURN(const std::string id_dir_str, IdDir(id));
  const fs::path id_dir(id_dir_str);
  const fs::path dir = id_dir / std::to_string(version);
  RETURN_IF_ERROR(CheckContained(dir.string(), BrickName(id, version)));
  std::error_code ec;
  if (!fs::is_regular_file(dir / kBrickManifestFile, ec)) {
    return absl::NotFoundError(absl::StrCat(BrickName(id, version), " not found"));
  }
  const fs::path trash = id_dir / absl::StrCat(".del-", version, "-", UniqueSuffix());
  if (::rename(dir.c_str(), trash.c_str()) != 0) {
    return ErrnoStatus(errno, absl::StrCat("cannot delete ", BrickName(id, version), ":"), dir);
  }
  SyncDir(id_dir);
  // remove_all does not follow symlinks: a symlinked version loses the link only.
  fs::remove_all(trash, ec);
  if (ec) {
    KLOG(WARNING) << "brick store: " << BrickName(id, version) << " is unpublished, but "
                  << trash.string() << " could not be removed: " << ec.message();
  }
  KLOG(INFO) << "brick store: deleted " << BrickName(id, version);
  return absl::OkStatus();
}

}  // namespace kiln
