// Creates the KeyIndex named by the `index` attribute.
#pragma once

#include <memory>
#include <string>

#include "contract.h"
#include "key_index.h"

namespace ice {

// Empty if `name` can be built in this library, else why not.
std::string index_unavailable_reason(const std::string& name);

// The index for one (batch, kv-head); throws std::invalid_argument for an unknown
// or unavailable name.
std::unique_ptr<KeyIndex> make_key_index(const std::string& name, const AttentionParams& params);

}  // namespace ice
