// pccl-wan-delay-line: a user-space WAN between network namespaces, for tests and benchmarks.
// pccl/testing/wan.py creates one namespace per emulated host with a persistent TUN device and
// runs this program, which reads every packet a host sends into its TUN, passes it through the
// emulated link to the destination host (link_model.hpp) and writes it into that host's TUN.
// One thread: epoll over the TUN fds, a signalfd and a timerfd armed for the next due packet.
#include <fstream>
#include <iterator>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "wan/config.hpp"
#include "wan/link_model.hpp"
#include "wan/tun.hpp"

namespace pccl::wan {
namespace {

// Packets read from one TUN before the loop looks at timers and the other TUNs again: large
// enough to amortise epoll_wait, small enough that one busy host cannot delay deliveries long.
constexpr int kReadBatch = 64;
constexpr int kMaxEpollEvents = 64;
constexpr uint64_t kSignalTag = ~0ull;
constexpr uint64_t kTimerTag = ~0ull - 1;
constexpr Nanos kNanosPerSecond = 1'000'000'000;
// The timer fires this long after the earliest due packet, so one wake-up delivers every packet due
// within that window: a packet is late by at most this, never early. On this kind of VM a wake-up
// costs some 20 us of kernel time; at 1 Gbit/s with MTU 9000 (one packet per 72 us) 100 us cut the
// delay line's CPU use from 52% to about 30% of a core.
constexpr Nanos kTimerSlackNs = 100'000;

Nanos now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return Nanos(ts.tv_sec) * kNanosPerSecond + ts.tv_nsec;
}

class DelayLine {
public:
    explicit DelayLine(const Config& config)
        : config_(config), pool_(config.mtu), network_(config, pool_, [this](size_t dst, const Packet& p) {
              if (write(tun_fds_[dst], p.data, p.len) < 0) ++write_errors_;
          }) {}

    bool start(std::string& error);
    void run();
    void print_stats(const char* when) const;

private:
    void read_host(size_t host);
    void arm_timer();
    bool handle_signal();
    void reload_cuts();

    const Config& config_;
    PacketPool pool_;
    Network network_;
    std::vector<int> tun_fds_;
    std::vector<uint8_t> discard_;
    int epoll_fd_ = -1, signal_fd_ = -1, timer_fd_ = -1;
    Nanos armed_for_ = 0;  // 0: the timerfd is not armed
    uint64_t write_errors_ = 0, no_buffer_drops_ = 0;
};

bool DelayLine::start(std::string& error) {
    for (const auto& host : config_.hosts) {
        int fd = attach_tun(host.netns, host.tun, error);
        if (fd < 0) return false;
        tun_fds_.push_back(fd);
    }
    sigset_t signals;
    sigemptyset(&signals);
    for (int s : {SIGTERM, SIGINT, SIGUSR1, SIGUSR2}) sigaddset(&signals, s);
    sigprocmask(SIG_BLOCK, &signals, nullptr);
    signal_fd_ = signalfd(-1, &signals, SFD_NONBLOCK | SFD_CLOEXEC);
    timer_fd_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    if (signal_fd_ < 0 || timer_fd_ < 0 || epoll_fd_ < 0) {
        error = std::string("signalfd/timerfd/epoll: ") + std::strerror(errno);
        return false;
    }
    auto watch = [&](int fd, uint64_t tag) {
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = tag;
        return epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) == 0;
    };
    bool ok = watch(signal_fd_, kSignalTag) && watch(timer_fd_, kTimerTag);
    for (size_t i = 0; ok && i < tun_fds_.size(); ++i) ok = watch(tun_fds_[i], i);
    if (!ok) error = std::string("epoll_ctl: ") + std::strerror(errno);
    return ok;
}

void DelayLine::read_host(size_t host) {
    Nanos now = now_ns();
    for (int i = 0; i < kReadBatch; ++i) {
        auto packet = pool_.take();
        if (!packet) {
            // Out of buffers: still read, or the level-triggered fd would wake us forever.
            discard_.resize(kMaxMtu);
            if (read(tun_fds_[host], discard_.data(), discard_.size()) < 0) return;
            ++no_buffer_drops_;
            continue;
        }
        ssize_t n = read(tun_fds_[host], packet->data, pool_.large_bytes());
        if (n <= 0) {
            pool_.give_back(*packet);
            return;
        }
        packet->len = uint32_t(n);
        network_.arrive(host, *packet, now);
    }
}

// Arms the timerfd for the earliest due packet (plus the slack). A timer set for later than needed
// is moved earlier; one set earlier than needed is left to fire and re-armed then, which costs one
// wake-up instead of a timerfd_settime per packet.
void DelayLine::arm_timer() {
    auto due = network_.next_due();
    if (!due) return;
    Nanos fire_at = *due + kTimerSlackNs;
    if (armed_for_ != 0 && armed_for_ <= fire_at) return;
    itimerspec spec{};
    spec.it_value.tv_sec = fire_at / kNanosPerSecond;
    spec.it_value.tv_nsec = fire_at % kNanosPerSecond;
    timerfd_settime(timer_fd_, TFD_TIMER_ABSTIME, &spec, nullptr);
    armed_for_ = fire_at;
}

// Prints "CUTS n" once the set is in force (wan.py waits for it), or "CUTS error ..." and keeps
// the previous set.
void DelayLine::reload_cuts() {
    std::string error = "no --cuts-file was given";
    if (!config_.cuts_file.empty()) {
        std::ifstream in(config_.cuts_file);
        std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        if (!in.good() && !in.eof()) {
            error = "cannot read " + config_.cuts_file;
        } else if (text.size() > kMaxCutsFileBytes) {
            error = "cuts file larger than 1 MiB";
        } else if (auto cuts = parse_cuts(text, config_.hosts.size(), error)) {
            network_.set_cuts(*cuts);
            std::printf("CUTS %zu\n", cuts->size());
            std::fflush(stdout);
            return;
        }
    }
    std::printf("CUTS error %s\n", error.c_str());
    std::fflush(stdout);
}

// Returns false once asked to stop.
bool DelayLine::handle_signal() {
    signalfd_siginfo info;
    bool keep_running = true;
    while (read(signal_fd_, &info, sizeof info) == sizeof info) {
        if (info.ssi_signo == SIGUSR1) print_stats("now");
        else if (info.ssi_signo == SIGUSR2) reload_cuts();
        else keep_running = false;
    }
    return keep_running;
}

void DelayLine::run() {
    std::printf("READY hosts=%zu pid=%d\n", config_.hosts.size(), int(getpid()));
    std::fflush(stdout);
    epoll_event events[kMaxEpollEvents];
    while (true) {
        network_.run_due(now_ns());
        arm_timer();
        int n = epoll_wait(epoll_fd_, events, kMaxEpollEvents, -1);
        if (n < 0 && errno != EINTR) {
            std::perror("epoll_wait");
            return;
        }
        for (int i = 0; i < n; ++i) {
            uint64_t tag = events[i].data.u64;
            if (tag == kSignalTag) {
                if (!handle_signal()) return;
            } else if (tag == kTimerTag) {
                uint64_t expirations;
                if (read(timer_fd_, &expirations, sizeof expirations) > 0) armed_for_ = 0;
            } else if (events[i].events & (EPOLLERR | EPOLLHUP)) {
                // The host's TUN device or namespace is gone (torn down under us): a level-triggered
                // error would wake this loop forever, so stop; the emulator is over anyway.
                std::fprintf(stderr, "host %zu's TUN device failed; exiting\n", size_t(tag));
                return;
            } else {
                read_host(size_t(tag));
            }
        }
    }
}

// One line of JSON after "STATS ", so wan.py can parse it; links that carried nothing are left out.
void DelayLine::print_stats(const char* when) const {
    std::printf("STATS {\"when\":\"%s\",\"unroutable\":%llu,\"write_errors\":%llu,\"no_buffer\":%llu,\"links\":[",
                when, (unsigned long long)network_.unroutable(), (unsigned long long)write_errors_,
                (unsigned long long)no_buffer_drops_);
    const char* sep = "";
    size_t n = config_.hosts.size();
    for (size_t src = 0; src < n; ++src)
        for (size_t dst = 0; dst < n; ++dst) {
            const LinkStats& s = network_.link_stats(src, dst);
            if (s.forwarded + s.lost + s.queue_drops + s.flow_drops == 0) continue;
            std::printf("%s{\"src\":%zu,\"dst\":%zu,\"forwarded\":%llu,\"bytes\":%llu,\"lost\":%llu,"
                        "\"queue_drops\":%llu,\"flow_drops\":%llu}",
                        sep, src, dst, (unsigned long long)s.forwarded, (unsigned long long)s.forwarded_bytes,
                        (unsigned long long)s.lost, (unsigned long long)s.queue_drops,
                        (unsigned long long)s.flow_drops);
            sep = ",";
        }
    std::printf("]}\n");
    std::fflush(stdout);
}

}  // namespace
}  // namespace pccl::wan

int main(int argc, char** argv) {
    using namespace pccl::wan;
    std::vector<std::string> args(argv + 1, argv + argc);
    // Not a config option: wan.py's in-process emulator asks for it so the delay line never
    // outlives a test process that crashed; the detached CLI mode leaves it out.
    auto flag = std::find(args.begin(), args.end(), "--exit-with-parent");
    bool exit_with_parent = flag != args.end();
    if (exit_with_parent) args.erase(flag);
    std::string error;
    auto config = parse_args(args, error);
    if (!config) {
        if (error.empty()) {  // --help
            std::fputs(usage(), stdout);
            return 0;
        }
        std::fprintf(stderr, "%s\n%s", error.c_str(), usage());
        return 2;
    }
    if (exit_with_parent) prctl(PR_SET_PDEATHSIG, SIGTERM);
    DelayLine line(*config);
    if (!line.start(error)) {
        std::fprintf(stderr, "pccl-wan-delay-line: %s\n", error.c_str());
        return 1;
    }
    line.run();
    line.print_stats("exit");
    return 0;
}
