/* SPDX-License-Identifier: MIT */
/*
 * Offset tracking for at-least-once consumption. One tracker per assigned
 * Kafka partition records, in consume order, every offset whose work is
 * not finished; the offset that is safe to commit is the oldest unfinished
 * one (or one past the newest consumed when nothing is unfinished), so a
 * restart replays exactly what had not completed, never less.
 *
 * Threads: fo_offsets_add() and fo_offsets_commit_point() are called by the
 * consumer thread; fo_offsets_done() by whichever thread finished the
 * work. A tracker is reference counted because work may outlive the
 * partition's assignment (a rebalance revokes it while events are in
 * flight); each unfinished offset holds a reference.
 */
#ifndef FO_OFFSETS_H
#define FO_OFFSETS_H

#include <stdint.h>

typedef struct fo_offsets fo_offsets;

/* Returns a tracker with one reference held by the caller, or NULL. */
fo_offsets *fo_offsets_new(int32_t partition);

void fo_offsets_ref(fo_offsets *t);

/* Drops one reference; the tracker is freed with the last one. */
void fo_offsets_unref(fo_offsets *t);

int32_t fo_offsets_partition(const fo_offsets *t);

/*
 * Records `offset` as consumed and unfinished, taking a reference for it.
 * Offsets must be added in increasing order. Returns FO_OK, FO_EINVAL
 * (not increasing) or FO_ENOMEM.
 */
int fo_offsets_add(fo_offsets *t, int64_t offset);

/*
 * Marks `offset` finished and drops its reference; `t` may be freed by
 * the call. An offset that was never added is ignored.
 */
void fo_offsets_done(fo_offsets *t, int64_t offset);

/*
 * The offset to commit (the next one to read after a restart), or -1
 * when nothing has been consumed yet.
 */
int64_t fo_offsets_commit_point(fo_offsets *t);

/* Number of offsets consumed and not finished. */
uint64_t fo_offsets_unfinished(fo_offsets *t);

#endif /* FO_OFFSETS_H */
