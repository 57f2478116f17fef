/* LD_PRELOAD shim: every call that would create, open for writing or rename something whose path starts with
 * $FAULT_PREFIX fails with errno $FAULT_ERRNO, as a failing disk (EIO), a read-only remount (EROFS) or a lost
 * permission (EACCES) would. Reads, and paths elsewhere, pass through. Built by tests/fault/test_write_errors.py:
 *     gcc -shared -fPIC -O2 -o failing_writes.so failing_writes.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int fails(const char *path) {
  const char *prefix = getenv("FAULT_PREFIX");
  if (prefix == NULL || path == NULL || strncmp(path, prefix, strlen(prefix)) != 0) return 0;
  errno = atoi(getenv("FAULT_ERRNO"));
  return 1;
}

#define WRITING(flags) ((flags) & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND))
#define REAL(name) ((typeof(&name))dlsym(RTLD_NEXT, #name))

#define OPEN(name)                                                          \
  int name(const char *path, int flags, ...) {                              \
    va_list ap; va_start(ap, flags); mode_t mode = va_arg(ap, mode_t); va_end(ap); \
    if (WRITING(flags) && fails(path)) return -1;                           \
    return REAL(name)(path, flags, mode);                                   \
  }
OPEN(open)
OPEN(open64)

#define OPENAT(name)                                                        \
  int name(int dirfd, const char *path, int flags, ...) {                   \
    va_list ap; va_start(ap, flags); mode_t mode = va_arg(ap, mode_t); va_end(ap); \
    if (WRITING(flags) && fails(path)) return -1;                           \
    return REAL(name)(dirfd, path, flags, mode);                            \
  }
OPENAT(openat)
OPENAT(openat64)

int creat(const char *path, mode_t mode) { return fails(path) ? -1 : REAL(creat)(path, mode); }
int mkdir(const char *path, mode_t mode) { return fails(path) ? -1 : REAL(mkdir)(path, mode); }
int mkdirat(int dirfd, const char *path, mode_t mode) {
  return fails(path) ? -1 : REAL(mkdirat)(dirfd, path, mode);
}
int rename(const char *from, const char *to) { return fails(to) ? -1 : REAL(rename)(from, to); }
int renameat(int fromfd, const char *from, int tofd, const char *to) {
  return fails(to) ? -1 : REAL(renameat)(fromfd, from, tofd, to);
}
