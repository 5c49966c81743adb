// A small fork-join pool for the engine's batch calls.
//
// `parallel_for(n, fn)` runs fn(0..n-1) on up to size() threads, the calling thread included,
// and returns when all are done. Workers are started lazily on the first parallel call, so a
// forest that only ever runs small batches never owns a thread. One job runs at a time: a call
// that finds the pool busy (another Python thread inside the same forest) runs its job inline
// on its own thread instead of waiting, so concurrent calls never deadlock on the pool.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace rstar {

class ThreadPool {
 public:
  // n_threads: total threads including the caller; 0 = std::thread::hardware_concurrency().
  explicit ThreadPool(unsigned n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  unsigned size() const { return size_; }

  // Runs fn(i) for every i in [0, n); blocks until all have returned. The first exception
  // thrown by fn is rethrown here (after every task has finished).
  void parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn);

 private:
  void start_workers();  // under run_mutex_
  void worker_loop();
  void run_tasks();  // claims task indices of the current job until none are left

  unsigned size_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // held by the caller that owns the current job

  std::mutex mutex_;  // guards the fields below
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(std::size_t)>* job_ = nullptr;
  std::size_t job_size_ = 0;
  std::uint64_t generation_ = 0;
  unsigned active_ = 0;  // workers still inside the current job
  bool stop_ = false;
  std::exception_ptr error_;

  std::atomic<std::size_t> next_{0};
};

}  // namespace rstar
