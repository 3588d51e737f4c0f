// The brick store: the folder given as --brick_dir, laid out as
// <root>/<id>/<version>/ (docs/BRICKS.md), and the only code that writes to it.
//
// Reads go to the file system every time: another process (or an operator
// with `mv`) may publish a version at any moment, and the server polls List()
// to notice it. A version folder counts only once its brick.json exists, so a
// folder still being written is invisible; "latest" is the highest counted
// version.
//
// Containment: nothing resolves outside the root. Ids must match
// [a-z0-9][a-z0-9._-]{0,63} and versions are positive decimal integers without
// leading zeros, so neither can spell "..", "/" or an absolute path. Symlinks
// are allowed as long as they stay inside: an id folder, version folder or
// brick file whose canonical path lies outside the canonical root is refused
// with FAILED_PRECONDITION when named explicitly (the request was well-formed;
// the store on disk is not in a state to serve it) and is skipped by List()
// and by the "latest" lookup.
//
// Thread safety: every method may be called from any thread. Register and
// Delete serialise on a mutex (so two Registers without a version get
// distinct versions); reads take no lock. Publishing is atomic: a version is
// built in a hidden temporary folder beside its final place and renamed into
// place with RENAME_NOREPLACE, so readers see all of it or none of it, and an
// existing version is never overwritten. Deleting renames the folder out of
// sight first, then removes it.
//
// Temporary folders are named ".tmp-*" / ".del-*" inside <root>/<id>/; names
// starting with '.' are never versions, so readers skip them. A crash can leave
// one behind; the store never removes them itself (another process may own it).
#ifndef KILN_ROUTER_BRICK_STORE_H_
#define KILN_ROUTER_BRICK_STORE_H_

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "router/brick.h"

namespace kiln {

class BrickStore {
 public:
  // One id and its counted versions, ascending.
  struct Entry {
    std::string id;
    std::vector<int> versions;
  };

  // Opens the store at `root`, which must exist and be a directory (NOT_FOUND
  // or INVALID_ARGUMENT naming it). Nothing is read or written beyond that.
  static absl::StatusOr<std::unique_ptr<BrickStore>> Open(const std::string& root);

  BrickStore(const BrickStore&) = delete;
  BrickStore& operator=(const BrickStore&) = delete;

  // The canonical (absolute, symlink-free) path of the root.
  const std::string& root() const { return root_; }

  // OK if `id` matches [a-z0-9][a-z0-9._-]{0,63}; else INVALID_ARGUMENT naming it.
  static absl::Status ValidateBrickId(absl::string_view id);

  // The version folder of brick `id`: `version`, or the latest when unset,
  // read and checked with ReadBrickVersion (fingerprint not compared).
  //   INVALID_ARGUMENT     a bad id, a version < 1, or a broken version folder;
  //   NOT_FOUND            "brick \"x\"" (unknown id, or no counted version) or
  //                        "brick \"x\" version 3";
  //   FAILED_PRECONDITION  the folder or a file in it resolves outside the root.
  absl::StatusOr<BrickVersion> Resolve(absl::string_view id, std::optional<int> version) const;

  // Only the brick.json of `id` version `version`, parsed, with its id and
  // version checked against the folder; no other file is opened (so a
  // slow or broken weights file cannot hold up the caller). Errors as
  // Resolve's.
  absl::StatusOr<BrickManifest> ReadManifest(absl::string_view id, int version) const;

  // Every id that has at least one counted version, sorted by id, with its
  // counted versions ascending. Junk is skipped without error: names that are
  // not valid ids, version names that are not canonical positive integers,
  // version folders without brick.json, plain files, and anything resolving
  // outside the root. Manifests are not parsed (Resolve does that).
  std::vector<Entry> List() const;

  // Counted versions of `id`, ascending; empty when the id is unknown.
  // INVALID_ARGUMENT for a bad id; FAILED_PRECONDITION if <root>/<id>
  // resolves outside the root.
  absl::StatusOr<std::vector<int>> Versions(absl::string_view id) const;

  // Publishes a copy of `source_dir` (adapter_config.json,
  // adapter_model.safetensors, brick.json; other files are not copied) as
  // brick `id` version `version`. Unset version: one above the highest
  // version folder present (counted or not, so a folder another writer is
  // still filling is never taken), i.e. latest + 1. The manifest's "id" and
  // "version" are rewritten to the target's; every other field is kept. The
  // new folder is validated with ReadBrickVersion before it is published.
  //   ALREADY_EXISTS       that version folder exists;
  //   INVALID_ARGUMENT     bad id or version, or the source is not a valid
  //                        brick (the message names the file);
  //   NOT_FOUND            source_dir or one of its three files is missing;
  //   FAILED_PRECONDITION  <root>/<id> resolves outside the root;
  //   other codes          file-system errors (errno), naming the path.
  // Returns the published version as Resolve would.
  absl::StatusOr<BrickVersion> Register(absl::string_view id, std::optional<int> version,
                                        const std::string& source_dir);

  // As Register, from the three files' bytes (for an upload RPC).
  // `manifest_json` is a brick.json whose id and version are rewritten.
  absl::StatusOr<BrickVersion> RegisterBytes(absl::string_view id, std::optional<int> version,
                                             absl::string_view adapter_config_json,
                                             absl::string_view adapter_safetensors,
                                             absl::string_view manifest_json);

  // Removes brick `id` version `version` (a counted version). NOT_FOUND
  // "brick \"x\" version 3" if absent; INVALID_ARGUMENT for a bad id or
  // version; FAILED_PRECONDITION if <root>/<id> resolves outside the root. A
  // symlinked version folder is unlinked; its target is left alone. The id
  // folder stays, even when empty.
  absl::Status Delete(absl::string_view id, int version);

 private:
  explicit BrickStore(std::string root) : root_(std::move(root)) {}

  // The three files of a version, in memory or as paths to copy.
  struct Source;

  // Checks `id`, then returns <root>/<id> (which need not exist), or
  // FAILED_PRECONDITION when it exists and resolves outside the root.
  absl::StatusOr<std::string> IdDir(absl::string_view id) const;
  // The checked folder of a version (latest when unset) holding a brick.json,
  // and the version number.
  absl::StatusOr<std::pair<std::string, int>> VersionDir(absl::string_view id,
                                                         std::optional<int> version) const;
  // Counted versions under `id_dir` that stay inside the root, ascending.
  std::vector<int> CountedVersions(const std::string& id_dir) const;
  // FAILED_PRECONDITION unless `path` (if it exists) resolves inside the root.
  absl::Status CheckContained(const std::string& path, absl::string_view what) const;
  absl::StatusOr<BrickVersion> Publish(absl::string_view id, std::optional<int> version,
                                       const Source& source);

  const std::string root_;
  absl::Mutex write_mu_;  // serialises Register / Delete
};

}  // namespace kiln

#endif  // KILN_ROUTER_BRICK_STORE_H_
