/* LD_PRELOAD shim: a slow disk. Every write, pwrite, writev and fsync to a file whose path starts with
 * $SLOW_PREFIX first sleeps $SLOW_WRITE_MS milliseconds; other files and all reads run at full speed.
 * Built by tests/fault/test_slow_disk.py:
 *     gcc -shared -fPIC -O2 -o slow_writes.so slow_writes.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define REAL(name) ((typeof(&name))dlsym(RTLD_NEXT, #name))

static void slow_if_under_prefix(int fd) {
  const char *prefix = getenv("SLOW_PREFIX");
  const char *ms = getenv("SLOW_WRITE_MS");
  if (prefix == NULL || ms == NULL || fd < 3) return;
  char link[64], path[4096];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, path, sizeof path - 1);
  if (n <= 0) return;
  path[n] = '\0';
  if (strncmp(path, prefix, strlen(prefix)) != 0) return;
  long wait_ms = atol(ms);
  struct timespec t = {wait_ms / 1000, (wait_ms % 1000) * 1000000L};
  nanosleep(&t, NULL);
}

ssize_t write(int fd, const void *buf, size_t count) {
  slow_if_under_prefix(fd);
  return REAL(write)(fd, buf, count);
}
ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
  slow_if_under_prefix(fd);
  return REAL(pwrite)(fd, buf, count, offset);
}
ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
  slow_if_under_prefix(fd);
  return REAL(pwrite64)(fd, buf, count, offset);
}
ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
  slow_if_under_prefix(fd);
  return REAL(writev)(fd, iov, iovcnt);
}
int fsync(int fd) {
  slow_if_under_prefix(fd);
  return REAL(fsync)(fd);
}
int fdatasync(int fd) {
  slow_if_under_prefix(fd);
  return REAL(fdatasync)(fd);
}
