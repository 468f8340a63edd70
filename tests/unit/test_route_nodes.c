/* Node-limited routing (router_forward_limited, DeepSeek-V3 section 2.1.2): hand-worked
 * cases where the limit changes the choice, the group-limited rule (top 2) reproduced bit
 * for bit, and a brute-force reference on random inputs: the top k of the M nodes with the
 * highest sums of their k/M best biased affinities. */
#include <math.h>

#include "../../lib/ops.h"
#include "../test.h"

static double urand(void)
{
    return (double)(test_rand() >> 11) * 0x1p-53;
}

static int chosen(const int *idx, int K, int x)
{
    for (int k = 0; k < K; k++)
        if (idx[k] == x)
            return 1;
    return 0;
}

/* 8 experts on 4 nodes of 2, k 4, M 2. Logits 0 (s = 0.5 each), so the biased scores are
 * 0.5 + bias: 1.4 0.5 | 1.0 0.95 | 1.1 0.6 | 0.7 0.7. Plain top 4: experts 0, 4, 2, 3 on
 * three nodes. Node scores (top 2): 1.9, 1.95, 1.7, 1.4: nodes 1 and 0 kept, and the top 4
 * of their experts is 0, 2, 3, 1 (expert 4, second best overall, is left out). */
static void test_hand_two_nodes(void)
{
    float logits[8] = {0}, bias[8] = {0.9f, 0.0f, 0.5f, 0.45f, 0.6f, 0.1f, 0.2f, 0.2f};
    float s[8], w[4];
    int idx[4];
    router_forward_limited(idx, w, s, logits, bias, 8, 4, 2, 4 / 2, 4, 1, 2.5f);
    int want[4] = {0, 2, 3, 1};
    for (int k = 0; k < 4; k++) {
        CHECKF(idx[k] == want[k], "k %d: expert %d, want %d", k, idx[k], want[k]);
        CHECKF(fabsf(w[k] - 0.625f) < 1e-6f, "weight %g, want 2.5/4", w[k]);
    }
    /* without the limit (4 of 4 nodes kept) expert 4 comes second */
    router_forward_limited(idx, w, s, logits, bias, 8, 4, 4, 2, 4, 1, 2.5f);
    CHECK(idx[0] == 0 && idx[1] == 4 && idx[2] == 2 && idx[3] == 3);
}

/* 8 experts on 2 nodes of 4, k 4, M 1: a node is scored by its top k/M = 4. Scores
 * 1.5 0.5 0.5 0.5 | 0.8 0.8 0.8 0.8: sums 3.0 and 3.2, so node 1 wins and experts 4-7 are
 * chosen, where V3's group rule (top 2: 2.0 vs 1.6) keeps node 0. */
static void test_hand_top_k_over_m(void)
{
    float logits[8] = {0}, bias[8] = {1.0f, 0, 0, 0, 0.3f, 0.3f, 0.3f, 0.3f};
    float s[8], w[4];
    int idx[4];
    router_forward_limited(idx, w, s, logits, bias, 8, 2, 1, 4, 4, 1, 1.0f);
    for (int x = 4; x < 8; x++)
        CHECKF(chosen(idx, 4, x), "expert %d not chosen", x);
    router_forward(idx, w, s, logits, bias, 8, 2, 1, 4, 1, 1.0f);
    for (int x = 0; x < 4; x++)
        CHECKF(chosen(idx, 4, x), "group rule: expert %d not chosen", x);
}

/* The reference: node scores by sorting, the M best nodes (ties: lower index), the top k
 * of their experts (ties: lower index). */
static void brute(int *want, const float *choice, int E, int G, int M, int top, int K)
{
    int per = E / G;
    double score[G];
    for (int g = 0; g < G; g++) {
        float v[per];
        memcpy(v, choice + g * per, sizeof v);
        for (int i = 0; i < per; i++)  /* descending */
            for (int j = i + 1; j < per; j++)
                if (v[j] > v[i]) {
                    float t = v[i];
                    v[i] = v[j];
                    v[j] = t;
                }
        float sum = 0;
        for (int i = 0; i < (top < per ? top : per); i++)
            sum += v[i];
        score[g] = sum;
    }
    int keep[G];
    memset(keep, 0, sizeof keep);
    for (int r = 0; r < M; r++) {
        int b = -1;
        for (int g = 0; g < G; g++)
            if (!keep[g] && (b < 0 || score[g] > score[b]))
                b = g;
        keep[b] = 1;
    }
    memset(want, 0, sizeof(int) * E);
    for (int r = 0; r < K; r++) {
        int b = -1;
        for (int x = 0; x < E; x++)
            if (keep[x / per] && !want[x] && (b < 0 || choice[x] > choice[b]))
                b = x;
        want[b] = 1;
    }
}

static void test_random_against_reference(void)
{
    for (int trial = 0; trial < 300; trial++) {
        int G = 1 + (int)(urand() * 8), per = 1 + (int)(urand() * 6), E = G * per;
        int M = 1 + (int)(urand() * G), K = 1 + (int)(urand() * (M * per));
        int top = K / M > 0 ? K / M : 1;
        float logits[64], bias[64], s[64], w[64], choice[64];
        int idx[64], want[64];
        for (int x = 0; x < E; x++) {
            logits[x] = (float)(4 * urand() - 2);
            bias[x] = (float)(0.4 * urand() - 0.2);
        }
        router_forward_limited(idx, w, s, logits, bias, E, G, M, top, K, 1, 1.0f);
        for (int x = 0; x < E; x++)
            choice[x] = s[x] + bias[x];
        brute(want, choice, E, G, M, top, K);
        int nodes[8] = {0}, used = 0;
        for (int k = 0; k < K; k++) {
            CHECKF(want[idx[k]], "trial %d: expert %d is not the reference's", trial, idx[k]);
            used += !nodes[idx[k] / per]++;
        }
        CHECKF(used <= M, "trial %d: %d nodes used, limit %d", trial, used, M);
        if (per >= 2) {  /* group_top 2 is router_forward, bit for bit */
            int idx2[64];
            float w2[64], s2[64];
            router_forward_limited(idx, w, s, logits, bias, E, G, M, 2, K, 1, 1.5f);
            router_forward(idx2, w2, s2, logits, bias, E, G, M, K, 1, 1.5f);
            CHECK(memcmp(idx, idx2, sizeof(int) * K) == 0 && memcmp(w, w2, 4 * K) == 0);
        }
    }
}

int main(void)
{
    test_seed();
    RUN(test_hand_two_nodes);
    RUN(test_hand_top_k_over_m);
    RUN(test_random_against_reference);
    TEST_EXIT();
}
