import { Migration } from "@mikro-orm/migrations";
import { PLATFORM_ACCOUNT_ID } from "../../market/store-port.js";

/**
 * An order row `o` as JSON, as server/store/records.ts reads it: bigints as decimal strings (JSON
 * numbers would lose those above 2^53), times as epoch milliseconds (what a JavaScript date holds).
 */
const ORDER_JSON = `jsonb_build_object(
  'id', o.id,
  'consumerAccountId', o.consumer_account_id,
  'apiKeyId', o.api_key_id,
  'model', o.model,
  'workerId', o.worker_id,
  'providerAccountId', o.provider_account_id,
  'status', o.status,
  'pricePerMillionInput', o.price_per_million_input::text,
  'pricePerMillionOutput', o.price_per_million_output::text,
  'hold', o.hold::text,
  'maxTokens', o.max_tokens,
  'promptTokenBound', o.prompt_token_bound,
  'feeBasisPoints', o.fee_basis_points,
  'promptTokens', o.prompt_tokens,
  'completionTokens', o.completion_tokens,
  'reportedPromptTokens', o.reported_prompt_tokens::text,
  'reportedCompletionTokens', o.reported_completion_tokens::text,
  'trustSignals', o.trust_signals,
  'cost', o.cost::text,
  'fee', o.fee::text,
  'finishReason', o.finish_reason,
  'error', o.error,
  'createdAt', floor(extract(epoch from o.created_at) * 1000)::bigint::text,
  'firstTokenAt', floor(extract(epoch from o.first_token_at) * 1000)::bigint::text,
  'finishedAt', floor(extract(epoch from o.finished_at) * 1000)::bigint::text
)`;

/**
 * The ledger's hot path in SQL (issue 7): opening and settling orders run inside the database, so
 * each costs one statement (one round trip) instead of a dozen ORM round trips, and many of them
 * from concurrent orders can share one transaction (group commit, server/store/group-commit.ts).
 *
 * `market_ledger_batch(items jsonb)` takes an array of operations (`open` or `settle`, shaped by
 * server/store/hot-path.ts) and returns `{results, orders}`: one outcome per item, in order, and
 * the settled orders as they now are, by id (an open's row is the item itself). It runs in the caller's
 * transaction (one statement in autocommit mode: one transaction per batch). It locks first, in
 * the same global order as every other money operation (the orders to settle in id order, then
 * every involved account in id order), so batches never deadlock with each other or with the
 * ORM's transactions. Then it applies the items one after another: a later item sees the
 * balances an earlier one left. A business refusal (insufficient credits, an unknown order, a
 * duplicate id…) is an outcome, not an error, so it does not undo its batch-mates' work.
 *
 * The money is computed exactly as server/market/money.ts does it, in `numeric` (no overflow, no
 * rounding): cost = min(hold, ceil((prompt·p_in + completion·p_out) / 1e6)) with the counts capped
 * at the order's bounds, fee = floor(cost · feeBasisPoints / 10,000). Settling a final order
 * returns it unchanged (the first settlement stands).
 *
 * Plain PL/pgSQL within PostgreSQL 15, so the embedded PGlite and a PostgreSQL server run the same.
 */
export class Migration20251125000000_ledger_hot_path extends Migration {
  override async up(): Promise<void> {
    // Set-based: a few statements per batch, whatever its size. The rows the items need are read
    // (and locked) up front into arrays; the items are then applied one after another in memory,
    // each seeing what the earlier ones left (balances, orders opened or settled); the rows are
    // written at the end, once each (a hot account such as the platform's is updated once per
    // batch, not once per item), in item order.
    this.addSql(`
      create or replace function market_ledger_batch(items jsonb) returns jsonb
      language plpgsql
      -- Every row this function reads it finds by key. Its statements' plans are cached for the
      -- session; one planned while a table was small would scan that table whole forever after
      -- (seen: the orders table), and planning afresh for every batch costs more than the batch.
      -- Index scans are right at any size, so they are what the cached plans use.
      set enable_seqscan = off
      as $$
      declare
        v_settle_ids text[];
        v_open_ids text[];
        v_item jsonb;
        v_results jsonb[] := '{}';
        -- The locked accounts, in id order, and their balances as the items leave them.
        a_id text[];
        a_available bigint[];
        a_held bigint[];
        a_pending bigint[];
        a_dirty boolean[];
        -- Orders the items may settle: the locked ones, then those opened by this batch.
        o_id text[];
        o_status text[];
        o_consumer text[];
        o_provider text[];
        o_hold bigint[];
        o_price_input bigint[];
        o_price_output bigint[];
        o_max_tokens integer[];
        o_bound integer[];
        o_fee_basis_points integer[];
        -- What exists already: open items with these ids are conflicts, with other references
        -- they are refused.
        v_taken_ids text[];
        v_api_keys text[];
        v_workers text[];
        -- Rows to write at the end, in order. (Appending with || to a variable of the same name
        -- extends the array in place.)
        v_new_orders jsonb[] := '{}';
        v_settled jsonb[] := '{}';
        t_id text[] := '{}';
        t_kind text[] := '{}';
        t_order text[] := '{}';
        t_key text[] := '{}';
        t_at timestamptz[] := '{}';
        e_tx text[] := '{}';
        e_account text[] := '{}';
        e_book text[] := '{}';
        e_amount bigint[] := '{}';
        p_order text[] := '{}';
        p_account text[] := '{}';
        p_amount bigint[] := '{}';
        p_matures timestamptz[] := '{}';
        v_orders jsonb;
        -- One item.
        v_tx text;
        v_at timestamptz;
        v_id text;
        v_o integer;
        v_consumer integer;
        v_provider integer;
        v_platform integer;
        v_hold bigint;
        v_prompt integer;
        v_completion integer;
        v_cost bigint;
        v_fee bigint;
        v_share bigint;
      begin
        select coalesce(array_agg(distinct e->>'orderId') filter (where e->>'op' = 'settle'), '{}'),
          coalesce(array_agg(distinct e->>'id') filter (where e->>'op' = 'open'), '{}')
          into v_settle_ids, v_open_ids
          from jsonb_array_elements(items) as e;

        -- Locks in the global order of every money operation: orders (by id), then accounts (by id).
        -- (Statements with nothing to do are skipped: a lone item's batch is common.)
        o_id := '{}'; o_status := '{}'; o_consumer := '{}'; o_provider := '{}'; o_hold := '{}';
        o_price_input := '{}'; o_price_output := '{}'; o_max_tokens := '{}'; o_bound := '{}';
        o_fee_basis_points := '{}';
        if cardinality(v_settle_ids) > 0 then
          with locked as (
            select id, status, consumer_account_id, provider_account_id, hold, price_per_million_input,
              price_per_million_output, max_tokens, prompt_token_bound, fee_basis_points
            from orders where id = any(v_settle_ids) order by id for update
          )
          select coalesce(array_agg(id), '{}'), coalesce(array_agg(status), '{}'),
            coalesce(array_agg(consumer_account_id), '{}'), coalesce(array_agg(provider_account_id), '{}'),
            coalesce(array_agg(hold), '{}'), coalesce(array_agg(price_per_million_input), '{}'),
            coalesce(array_agg(price_per_million_output), '{}'), coalesce(array_agg(max_tokens), '{}'),
            coalesce(array_agg(prompt_token_bound), '{}'), coalesce(array_agg(fee_basis_points), '{}')
          into o_id, o_status, o_consumer, o_provider, o_hold, o_price_input, o_price_output, o_max_tokens,
            o_bound, o_fee_basis_points
          from locked;
        end if;
        with locked as (
          select id, available, held, pending from accounts where id in (
              select e->>'consumerAccountId' from jsonb_array_elements(items) as e where e->>'op' = 'open'
              union select e->>'providerAccountId' from jsonb_array_elements(items) as e where e->>'op' = 'open'
              union select unnest(o_consumer)
              union select unnest(o_provider)
              union select '${PLATFORM_ACCOUNT_ID}' where cardinality(v_settle_ids) > 0
            ) order by id for update
        )
        select coalesce(array_agg(id order by id), '{}'), coalesce(array_agg(available order by id), '{}'),
          coalesce(array_agg(held order by id), '{}'), coalesce(array_agg(pending order by id), '{}'),
          coalesce(array_agg(false), '{}')
        into a_id, a_available, a_held, a_pending, a_dirty from locked;
        v_platform := array_position(a_id, '${PLATFORM_ACCOUNT_ID}');

        if cardinality(v_open_ids) > 0 then
          select coalesce(array_agg(id), '{}') into v_taken_ids from orders where id = any(v_open_ids);
          select coalesce(array_agg(id), '{}') into v_api_keys from api_keys where id in (
            select e->>'apiKeyId' from jsonb_array_elements(items) as e where e->>'op' = 'open');
          select coalesce(array_agg(id), '{}') into v_workers from workers where id in (
            select e->>'workerId' from jsonb_array_elements(items) as e where e->>'op' = 'open');
        end if;

        for v_item in select e.value from jsonb_array_elements(items) with ordinality as e order by e.ordinality loop
          v_tx := v_item->>'transactionId';
          v_at := (v_item->>'createdAt')::timestamptz;

          if v_item->>'op' = 'open' then
            v_id := v_item->>'id';
            v_consumer := array_position(a_id, v_item->>'consumerAccountId');
            v_provider := array_position(a_id, v_item->>'providerAccountId');
            v_hold := (v_item->>'hold')::bigint;
            if v_consumer is null or v_provider is null then
              v_results := array_append(v_results, jsonb_build_object('outcome', 'account_not_found',
                'accountId', case
                  when v_consumer is null and v_provider is null
                    then least(v_item->>'consumerAccountId', v_item->>'providerAccountId')
                  when v_consumer is null then v_item->>'consumerAccountId'
                  else v_item->>'providerAccountId' end));
              continue;
            end if;
            if a_available[v_consumer] < v_hold then
              v_results := array_append(v_results, jsonb_build_object('outcome', 'insufficient_credits',
                'available', a_available[v_consumer]::text));
              continue;
            end if;
            if v_id = any(v_taken_ids) or array_position(o_id, v_id) is not null then
              v_results := array_append(v_results, jsonb_build_object('outcome', 'conflict'));
              continue;
            end if;
            if not (v_item->>'apiKeyId' = any(v_api_keys) and v_item->>'workerId' = any(v_workers)) then
              v_results := array_append(v_results, jsonb_build_object('outcome', 'reference_not_found'));
              continue;
            end if;
            v_new_orders := array_append(v_new_orders, v_item);
            o_id := array_append(o_id, v_id);
            o_status := array_append(o_status, 'running'::text);
            o_consumer := array_append(o_consumer, v_item->>'consumerAccountId');
            o_provider := array_append(o_provider, v_item->>'providerAccountId');
            o_hold := array_append(o_hold, v_hold);
            o_price_input := array_append(o_price_input, (v_item->>'pricePerMillionInput')::bigint);
            o_price_output := array_append(o_price_output, (v_item->>'pricePerMillionOutput')::bigint);
            o_max_tokens := array_append(o_max_tokens, (v_item->>'maxTokens')::integer);
            o_bound := array_append(o_bound, (v_item->>'promptTokenBound')::integer);
            o_fee_basis_points := array_append(o_fee_basis_points, (v_item->>'feeBasisPoints')::integer);
            -- Written even for a free order (no entries), so every order's life is in the ledger.
            t_id := t_id || v_tx; t_kind := t_kind || 'hold'::text; t_order := t_order || v_id;
            t_key := t_key || null::text; t_at := t_at || v_at;
            if v_hold <> 0 then
              e_tx := e_tx || v_tx; e_account := e_account || (v_item->>'consumerAccountId');
              e_book := e_book || 'available'::text; e_amount := e_amount || -v_hold;
              e_tx := e_tx || v_tx; e_account := e_account || (v_item->>'consumerAccountId');
              e_book := e_book || 'held'::text; e_amount := e_amount || v_hold;
              a_available[v_consumer] := a_available[v_consumer] - v_hold;
              a_held[v_consumer] := a_held[v_consumer] + v_hold;
              a_dirty[v_consumer] := true;
            end if;
            -- The caller knows the new order's row: it sent all of it.
            v_results := array_append(v_results, jsonb_build_object('outcome', 'ok'));

          elsif v_item->>'op' = 'settle' then
            v_id := v_item->>'orderId';
            v_o := array_position(o_id, v_id);
            if v_o is null then
              v_results := array_append(v_results, jsonb_build_object('outcome', 'order_not_found'));
              continue;
            end if;
            -- Already final: the first settlement stands (what makes settling idempotent).
            if o_status[v_o] <> 'running' then
              v_results := array_append(v_results, jsonb_build_object('outcome', 'ok', 'orderId', v_id));
              continue;
            end if;
            -- The caller clamped the counts to 0..2^31-1; the order's bounds cap them here.
            v_prompt := least((v_item->>'promptTokens')::integer, o_bound[v_o]);
            v_completion := least((v_item->>'completionTokens')::integer, o_max_tokens[v_o]);
            v_cost := least(
              o_hold[v_o]::numeric,
              div(v_prompt::numeric * o_price_input[v_o] + v_completion::numeric * o_price_output[v_o] + 999999,
                1000000)
            )::bigint;
            v_fee := div(v_cost::numeric * o_fee_basis_points[v_o], 10000)::bigint;
            v_share := v_cost - v_fee;
            v_consumer := array_position(a_id, o_consumer[v_o]);
            v_provider := array_position(a_id, o_provider[v_o]);
            if v_share > 0 and v_provider is null then
              v_results := array_append(v_results, jsonb_build_object('outcome', 'no_provider'));
              continue;
            end if;
            o_status[v_o] := v_item->>'status';
            v_settled := array_append(v_settled, v_item || jsonb_build_object(
              'promptTokens', v_prompt, 'completionTokens', v_completion,
              'cost', v_cost::text, 'fee', v_fee::text));

            -- At most one settlement per order, enforced by the unique index too.
            t_id := t_id || v_tx; t_kind := t_kind || 'settle'::text; t_order := t_order || v_id;
            t_key := t_key || ('settle/' || v_id); t_at := t_at || v_at;
            -- The postings, in this order: the hold leaves the consumer's held book, the change
            -- returns to its available book, the fee goes to the platform, the rest to the
            -- provider's pending book. Zero postings are left out.
            if o_hold[v_o] <> 0 then
              e_tx := e_tx || v_tx; e_account := e_account || o_consumer[v_o];
              e_book := e_book || 'held'::text; e_amount := e_amount || -o_hold[v_o];
              a_held[v_consumer] := a_held[v_consumer] - o_hold[v_o];
              a_dirty[v_consumer] := true;
            end if;
            if o_hold[v_o] - v_cost <> 0 then
              e_tx := e_tx || v_tx; e_account := e_account || o_consumer[v_o];
              e_book := e_book || 'available'::text; e_amount := e_amount || (o_hold[v_o] - v_cost);
              a_available[v_consumer] := a_available[v_consumer] + (o_hold[v_o] - v_cost);
            end if;
            if v_fee <> 0 then
              e_tx := e_tx || v_tx; e_account := e_account || '${PLATFORM_ACCOUNT_ID}'::text;
              e_book := e_book || 'available'::text; e_amount := e_amount || v_fee;
              a_available[v_platform] := a_available[v_platform] + v_fee;
              a_dirty[v_platform] := true;
            end if;
            if v_share > 0 then
              e_tx := e_tx || v_tx; e_account := e_account || o_provider[v_o];
              e_book := e_book || 'pending'::text; e_amount := e_amount || v_share;
              a_pending[v_provider] := a_pending[v_provider] + v_share;
              a_dirty[v_provider] := true;
              p_order := p_order || v_id; p_account := p_account || o_provider[v_o];
              p_amount := p_amount || v_share; p_matures := p_matures || (v_item->>'maturesAt')::timestamptz;
            end if;
            v_results := array_append(v_results, jsonb_build_object('outcome', 'ok', 'orderId', v_id));

          else
            raise exception 'market_ledger_batch: unknown operation %', v_item->>'op';
          end if;
        end loop;

        -- Parents before children (foreign keys), each in item order.
        if cardinality(v_new_orders) > 0 then
          insert into orders (
            id, consumer_account_id, api_key_id, model, worker_id, provider_account_id, status,
            price_per_million_input, price_per_million_output, hold, max_tokens, prompt_token_bound,
            fee_basis_points, prompt_tokens, completion_tokens, reported_prompt_tokens,
            reported_completion_tokens, trust_signals, cost, fee, finish_reason, error, created_at,
            first_token_at, finished_at
          )
          select i->>'id', i->>'consumerAccountId', i->>'apiKeyId', i->>'model', i->>'workerId',
            i->>'providerAccountId', 'running', (i->>'pricePerMillionInput')::bigint,
            (i->>'pricePerMillionOutput')::bigint, (i->>'hold')::bigint, (i->>'maxTokens')::integer,
            (i->>'promptTokenBound')::integer, (i->>'feeBasisPoints')::integer, 0, 0, null, null, '[]'::jsonb,
            0, 0, null, null, (i->>'createdAt')::timestamptz, null, null
          from unnest(v_new_orders) with ordinality as u(i, n) order by u.n;
        end if;
        if cardinality(v_settled) > 0 then
          update orders as o set
            status = s->>'status',
            prompt_tokens = (s->>'promptTokens')::integer,
            completion_tokens = (s->>'completionTokens')::integer,
            reported_prompt_tokens = (s->>'reportedPromptTokens')::bigint,
            reported_completion_tokens = (s->>'reportedCompletionTokens')::bigint,
            trust_signals = s->'trustSignals',
            cost = (s->>'cost')::bigint,
            fee = (s->>'fee')::bigint,
            finish_reason = s->>'finishReason',
            error = s->>'error',
            first_token_at = coalesce((s->>'firstTokenAt')::timestamptz, o.first_token_at),
            finished_at = (s->>'finishedAt')::timestamptz
          from unnest(v_settled) as s
          where o.id = s->>'orderId';
        end if;
        if cardinality(t_id) > 0 then
          insert into ledger_transactions (id, kind, order_id, idempotency_key, created_at)
            select u.id, u.kind, u.order_id, u.key, u.at
            from unnest(t_id, t_kind, t_order, t_key, t_at) with ordinality as u(id, kind, order_id, key, at, n)
            order by u.n;
        end if;
        if cardinality(e_tx) > 0 then
          insert into ledger_entries (transaction_id, account_id, book, amount)
            select u.tx, u.account, u.book, u.amount
            from unnest(e_tx, e_account, e_book, e_amount) with ordinality as u(tx, account, book, amount, n)
            order by u.n;
        end if;
        if cardinality(p_order) > 0 then
          insert into pending_earnings (order_id, account_id, amount, matures_at, released_at)
            select u.order_id, u.account, u.amount, u.matures, null
            from unnest(p_order, p_account, p_amount, p_matures) as u(order_id, account, amount, matures);
        end if;
        -- Each account once, whatever the number of items that moved its money.
        update accounts as a set available = u.available, held = u.held, pending = u.pending
          from unnest(a_id, a_available, a_held, a_pending, a_dirty) as u(id, available, held, pending, dirty)
          where a.id = u.id and u.dirty;

        -- The settled orders as they now are (a settlement's answer is its order).
        if cardinality(v_settle_ids) > 0 then
          select jsonb_object_agg(o.id, ${ORDER_JSON}) into v_orders from orders as o
            where o.id = any(v_settle_ids);
        end if;
        return jsonb_build_object('results', to_jsonb(v_results), 'orders', coalesce(v_orders, '{}'::jsonb));
      end $$;`);
  }

  override async down(): Promise<void> {
    this.addSql("drop function market_ledger_batch(jsonb);");
  }
}
