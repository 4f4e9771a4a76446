// Every bound of the library in one place. A change here changes behaviour, so each says why.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace pccl::limits {

using std::chrono::milliseconds;

// ---- wire ----
inline constexpr uint32_t kControlMagic = 0x4C434350;  // "PCCL" little endian
inline constexpr uint32_t kDataMagic = 0x44434350;     // "PCCD" little endian
// 2: OP_END carries the op's tx/rx byte counts (summed by the master for its status page).
// 3: topology optimisation (VOTE_OPTIMIZE_TOPOLOGY, BANDWIDTH_PROBE/REPORT, PROBE_HELLO data frames).
// 4: the shared-state hash is XXH3-128 over 256 KiB chunks (pccl/_hashing.py), so GPUs can compute it;
//    OP_END says whether its suspect went silent (the master drops such a suspect).
// 5: SYNC_STALLED (a receiver's missing ranges go to other distributors in the same sync).
// 6: OP_TICKET and OP_BEGIN's claimed uid (an op may start before its OP_GO; see kSpeculative*).
inline constexpr uint16_t kProtocolVersion = 6;
// Before HELLO a connection may send only tiny frames; a registered peer's shared-state vote lists
// every entry (name, dtype, size, hash), so it may send up to kMaxPeerToMasterFrameBytes.
inline constexpr uint32_t kMaxUnregisteredFrameBytes = 64 * 1024;
inline constexpr uint32_t kMaxPeerToMasterFrameBytes = 16 * 1024 * 1024;
// Shared state: entries per vote, and transfer ranges per plan message.
inline constexpr uint32_t kMaxSyncEntries = 1u << 20;
inline constexpr uint32_t kMaxSyncRanges = 1u << 22;
// The master's topology message lists every peer (~40 bytes each): 16 MiB covers 400k peers.
inline constexpr uint32_t kMaxMasterToPeerFrameBytes = 16 * 1024 * 1024;
// A receiver's SYNC_STALLED lists a subset of the ranges its SYNC_PLAN listed, so it always fits.
static_assert(kMaxPeerToMasterFrameBytes >= kMaxMasterToPeerFrameBytes);
inline constexpr uint32_t kMaxWireStringBytes = 4096;
inline constexpr uint32_t kMaxPeersInTopology = 100000;
// One data piece: bounds the receiver's trust in a header's length field.
inline constexpr uint32_t kMaxDataPieceBytes = 64 * 1024 * 1024;

// ---- master ----
inline constexpr size_t kMaxMasterConnections = 4096;
// A peer that stops reading is dropped once this much is queued for it.
inline constexpr size_t kMaxMasterSendQueueBytes = 64 * 1024 * 1024;
// Ops one peer may have begun but not ended; more is a protocol violation.
inline constexpr size_t kMaxOpsInFlightPerPeer = 4096;
// Uids reserved per peer group for the next op of each tag after a success (OP_TICKET). A run that
// uses a fresh tag for every op would otherwise grow the table forever; the group's oldest
// reservation goes first (its op then simply waits for OP_GO), on the master and on every peer.
inline constexpr size_t kMaxReservedOps = 4096;
// A connection must say HELLO within this time or it is closed.
inline constexpr milliseconds kHelloDeadline{10000};

// ---- master status page (pccl-master --status-port; csrc/master/status.*, pccl/master.py) ----
// Most recently dropped peers the master remembers for the page; older ones are forgotten first.
inline constexpr size_t kMaxDroppedPeersRemembered = 32;
// One snapshot lists at most this many peers and operations in flight (the totals are always
// given, and a cut list says so), and at most this many peer ids per op's begun/waiting-for lists,
// so a snapshot costs the master's thread a bounded amount of copying.
inline constexpr size_t kMaxStatusPeersListed = 4096;
inline constexpr size_t kMaxStatusOpsListed = 256;
inline constexpr size_t kMaxStatusIdsPerOp = 64;
inline constexpr size_t kMaxStatusLinksListed = 1024;
// A status request waits this long for the master's thread to take its snapshot, then gives up.
inline constexpr milliseconds kStatusSnapshotTimeout{2000};
// The HTTP server: requests served at once (a connection over this is closed unanswered), and how
// long one connection may take to send its request and read the answer.
inline constexpr size_t kMaxStatusHttpConnections = 8;
inline constexpr milliseconds kStatusHttpTimeout{5000};

// ---- liveness ----
inline constexpr milliseconds kHeartbeatInterval{1000};
// Default for the heartbeat and progress deadlines; PCCL_PEER_TIMEOUT_MS overrides it.
inline constexpr milliseconds kDefaultPeerTimeout{10000};
// A peer that reports two silent ring neighbours within this window is dropped itself.
inline constexpr milliseconds kRepeatedSilenceWindow{60000};
inline constexpr milliseconds kMinPeerTimeout{200};
inline constexpr milliseconds kDeadlineCheckInterval{100};
// How often a blocked caller wakes to look for Ctrl-C.
inline constexpr milliseconds kCallerPollInterval{100};

// ---- peers ----
inline constexpr size_t kMaxPoolSize = 64;
// p2p_connection_pool_size 0. Measured on the WAN emulator (100 ms RTT, 1 Gbit/s, 100 Mbit/s per
// flow, 3 peers, 256 MiB): pool 1 10%, 4 37%, 16 74-89%, 32 72-74% of the link; on loopback 16
// is as fast as 1. README "Filling long fat pipes".
inline constexpr size_t kDefaultPoolSize = 16;
inline constexpr size_t kMaxIncomingP2PConnections = 4096;
inline constexpr milliseconds kP2PHandshakeDeadline{5000};
inline constexpr milliseconds kMasterConnectRetryDelay{500};
// SO_SNDBUF/SO_RCVBUF of data sockets; 0 leaves the kernel's autotuning on, which is the default:
// a fixed 4 MiB capped one connection at 0.37 Gbit/s on a 100 ms, 1 Gbit/s path where autotuning
// got 0.80, and on loopback autotuning was as fast or faster (pool 16, 64 MiB: 32 vs 35 ms).
inline constexpr int kSocketBufferBytes = 0;
// Unsent bytes a data socket may hold before write() says EAGAIN (TCP_NOTSENT_LOWAT). Bytes on the
// wire awaiting ACK do not count, so a long fat pipe still fills; what it bounds is the queue that
// sits *behind* the wire, which is what a small op would otherwise wait out after a big op's frames.
// The fair send queue can only interleave ops while frames are still in user space.
inline constexpr int kNotSentLowWatermarkBytes = 256 * 1024;
// TCP congestion control of data connections (TCP_CONGESTION; "system" keeps the kernel's default,
// PCCL_TCP_CONGESTION overrides). A pool is many flows over one path, and many BBR (v1) flows
// overrun its bottleneck: on the emulated 100 ms, 1 Gbit/s path with 16 connections they
// retransmitted 2.5% of their segments and a 256 MiB all-reduce took 3.3-4.1 s; CUBIC flows back
// off on loss, retransmitted 0.4-1.3% and took 3.14-3.27 s (alternating runs).
inline constexpr const char* kDataCongestionControl = "cubic";
// Frames wait in their pool's shared backlog and a connection takes more only while it holds fewer
// unwritten bytes than this (late binding): the connections that drain fastest carry the most. With
// pieces bound when queued, each of 16 connections got a fixed 1/16 of an op, and the one that a
// loss slowed set the op's end (100 ms RTT, 1 Gbit/s emulated WAN, 256 MiB: 3.1-3.7 s data phase).
inline constexpr size_t kBoundAheadBytes = 256 * 1024;
// Frames are written on a thread of their own (client/frame_writer.hpp) when the process may run
// on at least this many cores (PCCL_SEND_THREAD=on|off overrides). With fewer, the peers of one
// machine already keep every core busy and a second thread per peer only adds wake-ups.
inline constexpr unsigned kSendThreadMinCores = 4;
// A writer thread's round ends once this much went out: it then reports what it completed and takes
// new frames (0.4 ms at 20 Gbit/s; a round costs a few microseconds).
inline constexpr size_t kWriterRoundBytes = 1024 * 1024;
// Speculative start: a peer holding an OP_TICKET for a tag starts the ring as soon as it is called,
// one master round trip before OP_GO confirms the op (100 ms on a WAN). Until then it sends its next
// peer at most kSpeculativeBytes over all unconfirmed ops, and each op at most its own bytes /
// kSpeculativeOpDivisor (never under kSpeculativeMinBytes): the next peer may not have called yet
// and must hold those frames in memory (it never blocks a connection on them, which could stall
// another op's frames queued behind). 16 MiB cover 100 ms at 1.3 Gbit/s.
inline constexpr size_t kSpeculativeBytes = 16 * 1024 * 1024;
inline constexpr size_t kSpeculativeOpDivisor = 8;
inline constexpr size_t kSpeculativeMinBytes = 1024 * 1024;

// ---- ring ----
// Pieces are the unit of pipelining and striping: small enough that the ring streams and every
// connection of a pool gets work, big enough that the per-piece header, syscalls and wake-ups vanish.
inline constexpr size_t kMaxPieceBytes = 512 * 1024;
// A chunk is cut into about this many pieces (within the bounds around it), whatever the pool
// size: every peer must cut the same op the same way, and pools may differ between peers.
inline constexpr uint64_t kTargetPiecesPerChunk = 4;
// Shared-state transfers: an entry is split over distributors in ranges of at least this size,
// and each range travels in frames of kSyncFrameBytes (part of the protocol: the receiver checks
// every frame's offset and length against it).
inline constexpr size_t kSyncFrameBytes = 512 * 1024;
static_assert(kSyncFrameBytes <= kMaxDataPieceBytes);
inline constexpr size_t kMinSyncRangeBytes = 8 * 1024 * 1024;
inline constexpr size_t kMinPieceBytes = 256 * 1024;
// In-place ops keep one copy of the input; up to this many bytes of such copies stay cached.
inline constexpr size_t kMaxCachedScratchBytes = 1ull << 30;
inline constexpr size_t kMaxSendBatchIov = 64;
inline constexpr size_t kDiscardBufferBytes = 64 * 1024;

// ---- topology optimisation (optimize_topology; csrc/master/topology_*, csrc/client/bandwidth_probe.*) ----
// How long one directed pair streams. Long enough for TCP to leave slow start on a 100 ms path
// (cwnd doubles per RTT: ~7 RTTs to fill 1 Gbit/s), and only the second half of it is counted;
// PCCL_BANDWIDTH_PROBE_MS on the master overrides it.
inline constexpr milliseconds kBandwidthProbeDuration{1200};
inline constexpr milliseconds kMinBandwidthProbeDuration{50};
inline constexpr milliseconds kMaxBandwidthProbeDuration{30000};
// After its streaming time a probe waits this long for the receiver's receipt before reporting 0.
inline constexpr milliseconds kBandwidthProbeReceiptTimeout{5000};
// A measured rate is trusted this long, then measured again by the next optimize_topology().
inline constexpr std::chrono::seconds kBandwidthCacheTtl{600};
// Rings of up to this many peers are solved exactly (bottleneck Hamiltonian cycle, O(2^n n^2)).
inline constexpr size_t kMaxExactRingPeers = 16;
static_assert(kMaxExactRingPeers < 32, "the exact solver keeps member sets in 32-bit masks");
// Relocation passes of the heuristic used beyond kMaxExactRingPeers.
inline constexpr size_t kMaxRingHeuristicPasses = 64;
// The ring is only reordered when the new bottleneck beats the current one by this fraction:
// measurement noise alone must not reshuffle a ring (every reorder reconnects the pools).
inline constexpr double kRingImprovementMargin = 0.10;
// Write size of a probe's sender, and the most rate samples a probe's receiver keeps.
inline constexpr size_t kBandwidthProbeChunkBytes = 256 * 1024;
inline constexpr size_t kMaxBandwidthProbeSamples = 1 << 16;
// A receiver reads at most this much per wake-up, and takes at most this many probe connections
// at once (the master runs one probe per peer at a time, of at most kMaxPoolSize connections).
inline constexpr size_t kMaxProbeReadPerWakeup = 4 * 1024 * 1024;
inline constexpr size_t kMaxProbeConnections = 4 * kMaxPoolSize;
// The master gives a probe round its streaming time plus this long (connect, drain, receipt) before
// it counts the round's missing reports as failed probes.
inline constexpr milliseconds kBandwidthProbeRoundSlack{15000};

}  // namespace pccl::limits
