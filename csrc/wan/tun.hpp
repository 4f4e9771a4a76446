// Opening a TUN device that lives in another network namespace.
#pragma once

#include <string>

namespace pccl::wan {

// Enters `netns` (a name under /var/run/netns or an absolute path), attaches to the persistent TUN
// device `name` there (IFF_TUN | IFF_NO_PI: one read or write is one bare IP packet), and returns to
// the original namespace. The fd stays bound to that namespace's device; it is non-blocking.
// Returns -1 and sets `error` on failure.
int attach_tun(const std::string& netns, const std::string& name, std::string& error);

}  // namespace pccl::wan
