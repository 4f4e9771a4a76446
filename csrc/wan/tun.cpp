#include "wan/tun.hpp"

#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace pccl::wan {

namespace {

constexpr const char* kNetnsDir = "/var/run/netns/";

std::string describe(const std::string& what) { return what + ": " + std::strerror(errno); }

// The TUN must be opened while this thread is inside the target namespace: the kernel binds the
// fd to the namespace current at open() time and looks the device name up there.
int open_tun_here(const std::string& name, std::string& error) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        error = describe("open /dev/net/tun");
        return -1;
    }
    ifreq request{};
    request.ifr_flags = IFF_TUN | IFF_NO_PI;
    std::strncpy(request.ifr_name, name.c_str(), IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &request) < 0) {
        error = describe("TUNSETIFF " + name);
        close(fd);
        return -1;
    }
    return fd;
}

}  // namespace

int attach_tun(const std::string& netns, const std::string& name, std::string& error) {
    if (name.size() >= IFNAMSIZ) {
        error = "TUN name too long: " + name;
        return -1;
    }
    std::string path = netns.starts_with('/') ? netns : kNetnsDir + netns;
    int home = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    int target = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (home < 0 || target < 0) {
        error = describe("open " + (home < 0 ? std::string("/proc/self/ns/net") : path));
        if (home >= 0) close(home);
        return -1;
    }
    int fd = -1;
    if (setns(target, CLONE_NEWNET) < 0) {
        error = describe("setns " + path);
    } else {
        fd = open_tun_here(name, error);
        // Staying in the wrong namespace would attach every later TUN to the wrong device.
        if (setns(home, CLONE_NEWNET) < 0) {
            std::perror("setns back to the original namespace");
            std::abort();
        }
    }
    close(target);
    close(home);
    return fd;
}

}  // namespace pccl::wan
