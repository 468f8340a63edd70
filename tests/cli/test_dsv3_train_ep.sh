#!/bin/sh
# dsv3-train with expert parallelism on the CPU (--ep, lib/ep): 2 ranks holding half the
# experts each, and 4 ranks as 2 expert groups x 2 replicas, follow the single-process run
# of the same global batch within float reassociation (losses, gradient norms, weights),
# over MPI and TCP alike, and in SFT, where a rank whose rows ran out serves its experts
# idle; the checkpoint is one complete HF folder (a model shard per expert group) that
# resumes exactly on the same ranks (on others: test_dsv3_train_epresume.sh); bad --ep values are usage
# errors; node-limited routing (--route-nodes) gives the same results on 1 and 2 ranks;
# the metrics carry the rows each rank's experts received; a rank failing inside a pass
# stops every rank instead of leaving them waiting in an exchange; with replicas the expert
# moments are sharded over them (a piece file each) and resume exactly.
. "$(dirname "$0")/lib.sh"
EP_TEST=expert_parallel
. "$(dirname "$0")/ep_setup.sh"
AUX="--mtp-weight 0.3 --balance-alpha 0.01"

field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" "$2"; }
# close_losses A B TOL [FIELD]: as in test_dsv3_train_dp.sh; the largest relative
# difference goes to $T/diff.
close_losses() {
    field "${4:-loss}" "$2" >"$T/lb"
    field "${4:-loss}" "$1" | head -n "$(wc -l <"$T/lb")" >"$T/la"
    [ -s "$T/la" ] && [ "$(wc -l <"$T/la")" -eq "$(wc -l <"$T/lb")" ] || return 1
    paste "$T/la" "$T/lb" | awk -v tol="$3" '{ d = $1 - $2; if (d < 0) d = -d; r = d / $1;
        if (r > m) m = r } END { printf "%.2g\n", m > "/dev/stderr"; exit !(m <= tol) }' 2>"$T/diff"
}
# close_weights DIR_A DIR_B TOL: both checkpoint folders converted to one F32
# model.safetensors in the model's order, ||a - b|| / ||a|| within TOL.
close_weights() {
    for d in "$1" "$2"; do
        rm -rf "$d.f32"
        dsv3-convert --quiet --dtype f32 --max-shard-size 0 "$d" -o "$d.f32" || return 1
        f="$d.f32/model.safetensors"
        h=$(od -An -tu8 -N8 "$f" | tr -d ' ')
        od -An -v -tf4 -j $((8 + h)) "$f" | tr -s ' ' '\n' | grep . >"$d.txt"
    done
    paste "$1.txt" "$2.txt" | awk -v tol="$3" '{ d = $1 - $2; dd += d * d; aa += $1 * $1 }
        END { r = sqrt(dd / aa); printf "%.2g\n", r > "/dev/stderr"; exit !(NR > 1000 && r <= tol) }' 2>"$T/wdiff"
}

# (a) 2 ranks, --ep 2, against one process: at learning rate 0 the losses and gradient
# norms compare the gradient itself (seen: <= 3e-8 relative); learning 3 steps, the
# losses and the weights (seen: 1e-7 and 2.5e-5 on this VM, 2026-11-27).
G="-c $CFG -d $T/data -b 2 -g 8 --lr 0 --gamma 0 --quiet $AUX --steps 3"
A="-c $CFG -d $T/data -b 2 -g 8 --lr 3e-3 --warmup 2 --quiet $AUX --steps 3"
dsv3-train $G -o "$T/one0"
dsv3-train $A -o "$T/one"
expect ep2_gradient_exit_0 0 mpi 2 "$DSV3_BIN/dsv3-train" $G --ep 2 -o "$T/ep0"
check ep2_gradient_losses close_losses "$T/one0/metrics.jsonl" "$T/ep0/metrics.jsonl" 1e-6
check ep2_gradient_norms close_losses "$T/one0/metrics.jsonl" "$T/ep0/metrics.jsonl" 1e-6 grad_norm
echo "# --ep 2 vs 1 process, lr 0: largest relative grad-norm difference $(cat "$T/diff")"
expect ep2_exit_0 0 mpi 2 "$DSV3_BIN/dsv3-train" $A --ep 2 -o "$T/ep"
check ep2_losses close_losses "$T/one/metrics.jsonl" "$T/ep/metrics.jsonl" 1e-4
echo "# --ep 2 vs 1 process, 3 steps: largest relative loss difference $(cat "$T/diff")"
check ep2_weights close_weights "$T/one/step-000003" "$T/ep/step-000003" 1e-3
echo "# weights after 3 steps: |difference| / |weights| $(cat "$T/wdiff")"
S="$T/ep/step-000003"
check ep2_files sh -c "cd '$S' && [ -f model-00001-of-00002.safetensors ] && [ -f model-00002-of-00002.safetensors ] && [ -f optim-experts-00001-of-00002.safetensors ] && [ -f optim-rank00001-of-00002.safetensors ] && grep -q '\"ep\": 2' state.json"
check ep2_folder_is_complete sh -c "dsv3-convert --verify '$S' >/dev/null 2>&1"
# rows received per rank: a main MoE layer's sum over ranks is every routed slot of the
# step (8 sequences x 32 tokens x 2 experts)
rows=$(sed -n 's/.*"rows_per_rank":\[\[\([0-9]*\),\([0-9]*\)\].*/\1 \2/p' "$T/ep/metrics.jsonl" | head -n 1)
check ep2_rows_per_rank test "$(echo $rows | awk '{ print $1 + $2 }')" = 512

# The same exchange over the TCP backend (2 torchrun-style processes): the same bits as
# under mpirun.
export DSV3_COMM_TIMEOUT=20
port=$((10000 + $$ % 19000))
for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        dsv3-train $G --ep 2 -o "$T/tcp0" 2>"$T/tcp.$r" &
done
wait
for f in loss grad_norm; do field $f "$T/ep0/metrics.jsonl"; field $f "$T/tcp0/metrics.jsonl"; done >"$T/l1"
check ep2_tcp_same_as_mpi sh -c "[ \$(wc -l <'$T/l1') -eq 12 ] && [ \"\$(sed -n '1,3p;7,9p' '$T/l1')\" = \"\$(sed -n '4,6p;10,12p' '$T/l1')\" ]"

# (b) 4 ranks as 2 expert groups x 2 replicas (their expert gradients summed), one-sequence
# micro-batches, against one process.
G1="-c $CFG -d $T/data -b 1 -g 8 --lr 0 --gamma 0 --quiet $AUX --steps 2"
L1="-c $CFG -d $T/data -b 1 -g 8 --lr 3e-3 --quiet $AUX --steps 2"
dsv3-train $G1 -o "$T/one8"
dsv3-train $L1 -o "$T/one8l"
expect ep2dp2_gradient_exit_0 0 mpi 4 "$DSV3_BIN/dsv3-train" $G1 --ep 2 -o "$T/ep4"
check ep2dp2_gradient_norms close_losses "$T/one8/metrics.jsonl" "$T/ep4/metrics.jsonl" 1e-6 grad_norm
check ep2dp2_gradient_losses close_losses "$T/one8/metrics.jsonl" "$T/ep4/metrics.jsonl" 1e-6
expect ep2dp2_exit_0 0 mpi 4 "$DSV3_BIN/dsv3-train" $L1 --ep 2 -o "$T/ep4l"
check ep2dp2_losses close_losses "$T/one8l/metrics.jsonl" "$T/ep4l/metrics.jsonl" 1e-4
check ep2dp2_weights close_weights "$T/one8l/step-000002" "$T/ep4l/step-000002" 1e-3
echo "# --ep 2 x 2 replicas vs 1 process, 2 steps: weights $(cat "$T/wdiff")"

# (c) resume on the same ranks is exact: 2 steps, then --resume to 3, against the
# uninterrupted 3-step run of (a).
mpi 2 "$DSV3_BIN/dsv3-train" $A --ep 2 --steps 2 -o "$T/res" 2>/dev/null
expect ep2_resume_exit_0 0 mpi 2 "$DSV3_BIN/dsv3-train" $A --ep 2 --resume -o "$T/res"
field loss "$T/ep/metrics.jsonl" >"$T/l1"
field loss "$T/res/metrics.jsonl" >"$T/l2"
check ep2_resume_losses_exact sh -c "[ \$(wc -l <'$T/l2') -eq 3 ] && cmp -s '$T/l1' '$T/l2'"
check ep2_resume_weights_exact sh -c "cd '$T/ep/step-000003' && for f in model-0000*.safetensors optim-*.safetensors; do cmp -s \$f '$T/res/step-000003/'\$f || exit 1; done"

# (d) bad --ep values: usage errors (exit 2) before any work
expect_err ep_not_dividing_world 2 "does not divide the 2 ranks" \
    mpi 2 "$DSV3_BIN/dsv3-train" $G --ep 3 -o "$T/bad1"
expect_err ep_alone 2 "does not divide the 1 ranks" dsv3-train $G --ep 2 -o "$T/bad2"
expect_err ep_zero 2 "ep" dsv3-train $G --ep 0 -o "$T/bad3"
sed 's/"n_routed_experts": 8/"n_routed_experts": 6/; s/"n_group": 4/"n_group": 1/; s/"topk_group": 2/"topk_group": 1/' "$CFG" >"$T/six.json"
expect_err ep_not_dividing_experts 2 "does not divide the 6 routed experts" \
    mpi 4 "$DSV3_BIN/dsv3-train" -c "$T/six.json" -d "$T/data" --steps 1 --ep 4 -o "$T/bad4"
check ep_bad_left_nothing test ! -e "$T/bad1/metrics.jsonl" -a ! -e "$T/bad4/metrics.jsonl"

# (e) node-limited routing: experts in 2 nodes of 4, a token's 2 experts on 1 node, the
# same on 1 process and on 2 ranks; it changes the routing (another loss than without);
# the config's own group limit excludes it.
sed 's/"n_group": 4/"n_group": 1/; s/"topk_group": 2/"topk_group": 1/' "$CFG" >"$T/flat.json"
R="-c $T/flat.json -d $T/data -b 2 -g 8 --lr 0 --gamma 0 $AUX --steps 2"
dsv3-train $R --quiet -o "$T/flat1"
dsv3-train $R --quiet --route-nodes 1 --route-groups 2 -o "$T/node1"
expect route_nodes_ep2_exit_0 0 mpi 2 "$DSV3_BIN/dsv3-train" $R --ep 2 --route-nodes 1 -o "$T/node2" --route-groups 2
check ep2_step_line grep -q 'ep rows max/mean' "$T/out"
check route_nodes_note grep -q '8 experts in 2 nodes of 4, a token.s 2 experts on at most 1 nodes' "$T/err"
check route_nodes_ep2_losses close_losses "$T/node1/metrics.jsonl" "$T/node2/metrics.jsonl" 1e-6
check route_nodes_ep2_norms close_losses "$T/node1/metrics.jsonl" "$T/node2/metrics.jsonl" 1e-6 grad_norm
field loss "$T/flat1/metrics.jsonl" >"$T/l1"
field loss "$T/node1/metrics.jsonl" >"$T/l2"
check route_nodes_changes_routing sh -c "[ -s '$T/l1' ] && ! cmp -s '$T/l1' '$T/l2'"
expect_err route_nodes_vs_n_group 1 "already limits routing" \
    dsv3-train $G --route-nodes 2 -o "$T/bad5"
expect_err route_groups_needs_nodes 2 "needs --route-nodes" dsv3-train $G --route-groups 2 -o "$T/bad6"

# (e2) the routing is part of the checkpoint: a resume without the options routes as the run
# did (the losses of the uninterrupted run, bit for bit), other values are refused (exit 1,
# nothing written), a run without routing cannot gain it on resume, and a state written
# before the record existed still resumes with the options as given.
dsv3-train $R --quiet --route-nodes 1 --route-groups 2 --steps 1 -o "$T/nres" 2>/dev/null
check route_saved_in_state grep -q '"route_groups": 2' "$T/nres/step-000001/state.json"
check route_in_metrics grep -q '"route":{"nodes":1,"groups":2}' "$T/nres/metrics.jsonl"
expect route_resume_without_options 0 dsv3-train $R --resume -o "$T/nres"
check route_resume_note grep -q 'route-groups 2, from the checkpoint' "$T/err"
field loss "$T/nres/metrics.jsonl" >"$T/l2"
field loss "$T/node1/metrics.jsonl" >"$T/l1"
check route_resume_same_routing sh -c "[ \$(wc -l <'$T/l2') -eq 2 ] && cmp -s '$T/l1' '$T/l2'"
expect_err route_resume_other_nodes 1 "would route differently" \
    dsv3-train $R --steps 3 --route-nodes 2 --resume -o "$T/nres"
expect_err route_resume_other_groups 1 "trained with --route-nodes 1 --route-groups 2" \
    dsv3-train $R --steps 3 --route-nodes 1 --route-groups 4 --resume -o "$T/nres"
check route_refused_wrote_nothing test ! -e "$T/nres/step-000003"
expect route_resume_same_options 0 dsv3-train $R --steps 3 --route-nodes 1 --route-groups 2 --resume -o "$T/nres"
expect_err route_resume_gaining_routing 1 "trained without node-limited routing" \
    dsv3-train $R --steps 3 --route-nodes 1 --route-groups 2 --resume -o "$T/flat1"
check route_off_saved grep -q '"route_nodes": 0' "$T/flat1/step-000002/state.json"
cp -r "$T/flat1" "$T/old"
sed -i '/"route_nodes"/d' "$T/old/step-000002/state.json"
sed -i 's/\("world": [0-9]*\),$/\1/' "$T/old/step-000002/state.json"
expect route_old_state_resumes 0 dsv3-train $R --steps 3 --route-nodes 1 --route-groups 2 --resume -o "$T/old"
check route_old_state_recorded grep -q '"route_groups": 2' "$T/old/step-000003/state.json"

# (f) SFT: half the documents are long prompts without a response, so many records have no
# counted target and are dropped, and a rank often runs fewer forwards than the other (or
# none): it serves its experts idle. The same losses and gradient norms as one process.
awk -v seed="$SEED" 'BEGIN { srand(seed); for (i = 0; i < 80; i++) { s = "3"; if (rand() < 0.5) {
     for (j = 0; j < 28; j++) s = s " " 100 + int(rand() * 300); print s; continue }
     n = 1 + int(rand() * 6); for (j = 0; j < n; j++) s = s " " 100 + int(rand() * 300);
     s = s " 4"; m = 1 + int(rand() * 6); for (j = 0; j < m; j++) s = s " " 100 + int(rand() * 300);
     print s } }' >"$T/sft.txt"
dsv3-shard make --vocab-size 512 -o "$T/sft.shard" "$T/sft.txt"
dsv3-pack --quiet -o "$T/sftd" --eos-id 1 -L 32 --best-fit -s 1 "$T/sft.shard"
F="-c $CFG -d $T/sftd -b 1 -g 4 --lr 0 --gamma 0 --quiet $AUX --steps 4 --sft --sft-assistant-id 4 --sft-user-id 3"
dsv3-train $F -o "$T/sft1"
expect ep2_sft_exit_0 0 mpi 2 "$DSV3_BIN/dsv3-train" $F --ep 2 -o "$T/sft2"
check ep2_sft_losses close_losses "$T/sft1/metrics.jsonl" "$T/sft2/metrics.jsonl" 1e-6
check ep2_sft_norms close_losses "$T/sft1/metrics.jsonl" "$T/sft2/metrics.jsonl" 1e-6 grad_norm

# (g) a rank that fails inside an expert-parallel pass (after the ranks agreed to run it:
# here out of memory for the rows it is to receive, DSV3_TRAIN_EP_FAIL=RANK:N failing its
# N-th such buffer) still takes part in the exchanges, empty, until the ranks agree before
# the next rows move; every rank then stops with exit 1 (the failing one with its own
# message) instead of waiting in an all-to-all for ever (timeout: 124). N counts the MoE
# blocks of forwards and backwards (tiny: 3 a pass with MTP): 2 fails in the first forward,
# 5 in its backward; 4 ranks as 2 x 2 fail in another replica's block too.
epfail() { DSV3_TRAIN_EP_FAIL=$1 timeout 60 mpirun --oversubscribe -x DSV3_TRAIN_EP_FAIL -np "$2" \
    "$DSV3_BIN/dsv3-train" $A --ep 2 -o "$T/fail$1"; }
for c in 1:2:2 1:5:2 3:2:4 0:7:4; do
    f=${c%:*} n=${c##*:} r=${c%%:*}
    expect_err "ep_fail_${f}_np${n}_stops_all" 1 "rank $r of $n: model: out of memory for" epfail "$f" "$n"
    check "ep_fail_${f}_np${n}_others_told" grep -q "another rank failed in an expert-parallel exchange" "$T/err"
    check "ep_fail_${f}_np${n}_no_checkpoint" test ! -e "$T/fail$f/latest"
done

# (h) the expert moments are sharded over the replicas of a group (4 ranks as 2 x 2): each
# replica writes its piece (the two pieces of a group hold its moments once: their sizes
# add up to the one-replica file's of (a), plus one more step and shard header of 48
# bytes), and a resume on the same 4 ranks is exact.
mpi 4 "$DSV3_BIN/dsv3-train" $A --ep 2 -o "$T/sh4" 2>/dev/null
mpi 4 "$DSV3_BIN/dsv3-train" $A --ep 2 --steps 2 -o "$T/shr" 2>/dev/null
expect ep2dp2_resume_exit_0 0 mpi 4 "$DSV3_BIN/dsv3-train" $A --ep 2 --resume -o "$T/shr"
field loss "$T/sh4/metrics.jsonl" >"$T/l1"
field loss "$T/shr/metrics.jsonl" >"$T/l2"
check ep2dp2_resume_losses_exact sh -c "[ \$(wc -l <'$T/l2') -eq 3 ] && cmp -s '$T/l1' '$T/l2'"
check ep2dp2_resume_weights_exact sh -c "cd '$T/sh4/step-000003' && for f in model-0000*.safetensors optim-*.safetensors; do cmp -s \$f '$T/shr/step-000003/'\$f || exit 1; done"
moments() { od -An -tu8 -N8 "$1" | awk -v s="$(stat -c %s "$1")" '{ print s - 8 - $1 }'; }
S4="$T/sh4/step-000003"
m0=$(moments "$S4/optim-experts-00000-of-00002-part00000-of-00002.safetensors")
m1=$(moments "$S4/optim-experts-00000-of-00002-part00001-of-00002.safetensors")
mw=$(moments "$S/optim-experts-00000-of-00002.safetensors")
check ep2dp2_moments_sharded sh -c "[ ! -e '$S4/optim-experts-00000-of-00002.safetensors' ] && [ $((m0 + m1)) -eq $((mw + 48)) ] && [ $m0 -gt 48 ]"
# a 4-rank checkpoint whose expert moments are whole-group files (as before the sharding:
# here those of the 2-rank run's step 2) still resumes, each replica taking its piece
rm -rf "$T/old4" && cp -r "$T/shr" "$T/old4" && echo step-000002 >"$T/old4/latest" && rm -rf "$T/old4/step-000003"
rm "$T/old4/step-000002/"optim-experts-*-part*.safetensors
cp "$T/res/step-000002/"optim-experts-*.safetensors "$T/old4/step-000002/"
expect ep2dp2_whole_moments_resume 0 mpi 4 "$DSV3_BIN/dsv3-train" $A --ep 2 --resume -o "$T/old4"
