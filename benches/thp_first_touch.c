// First-touch cost of twinvol's large buffers (src/engine/buf.rs): a 2 MiB-aligned anonymous
// mapping advised MADV_HUGEPAGE, of which 1 MiB is written, against the same 1 MiB in 4 KiB
// pages; optionally after fragmenting memory first, to see whether the huge-page fault stalls
// in compaction (THP "defrag" mode madvise, Debian's default, compacts for advised mappings).
//
// Build and run (root not needed; FRAG_GIB must leave room in RAM, the pages are touched):
//   gcc -O2 -o /tmp/thp_first_touch benches/thp_first_touch.c
//   /tmp/thp_first_touch [FRAG_GIB [COUNT]]
// FRAG_GIB > 0 first maps that many GiB in 4 KiB pages, writes them all, and frees every other
// page (MADV_DONTNEED), leaving half of it as 4 KiB holes. Compare /proc/vmstat's compact_stall
// and thp_fault_fallback before and after. Figures: docs/BENCHMARKS.md.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void fragment(size_t gib) {
  size_t len = gib << 30;
  char *p = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) { perror("mmap (fragmenting)"); exit(1); }
  madvise(p, len, MADV_NOHUGEPAGE);
  for (size_t i = 0; i < len; i += 4096) p[i] = 1;
  for (size_t i = 0; i < len; i += 8192) madvise(p + i, 4096, MADV_DONTNEED);
  printf("fragmented %zu GiB: every other 4 KiB page freed (kept mapped)\n", gib);
}

// Writes 1 MiB of a fresh mapping `count` times; `huge`: 2 MiB-aligned and MADV_HUGEPAGE.
static void run(int count, int huge) {
  double sum = 0, worst = 0;
  for (int k = 0; k < count; k++) {
    size_t len = huge ? 4 << 20 : 1 << 20;
    char *m = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); exit(1); }
    char *a = m;
    if (huge) {
      a = (char *)(((uintptr_t)m + (2 << 20) - 1) & ~(uintptr_t)((2 << 20) - 1));
      madvise(a, 2 << 20, MADV_HUGEPAGE);
    } else {
      madvise(a, 1 << 20, MADV_NOHUGEPAGE);
    }
    double t = now();
    memset(a, 1, 1 << 20);
    double d = now() - t;
    sum += d;
    if (d > worst) worst = d;
  }
  printf("%s: first write of 1 MiB, %d mappings: mean %.3f ms, worst %.3f ms\n",
         huge ? "2 MiB-aligned, MADV_HUGEPAGE" : "4 KiB pages (MADV_NOHUGEPAGE)", count,
         sum / count * 1e3, worst * 1e3);
}

int main(int argc, char **argv) {
  size_t frag = argc > 1 ? strtoul(argv[1], 0, 10) : 0;
  int count = argc > 2 ? atoi(argv[2]) : 64;
  if (frag) fragment(frag);
  run(count, 0);
  run(count, 1);
  FILE *f = fopen("/proc/self/smaps_rollup", "r");
  char line[256];
  while (f && fgets(line, sizeof line, f))
    if (strstr(line, "AnonHugePages")) printf("this process: %s", line);
  return 0;
}
