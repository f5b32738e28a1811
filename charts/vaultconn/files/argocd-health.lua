-- Argo CD health check for vaultconn.dev/VaultConnection (Lua 5.1, as Argo CD embeds).
-- Install: argocd-cm key `resource.customizations.health.vaultconn.dev_VaultConnection`.
-- Phase → health: Ready → Healthy, Pending → Progressing (the message names what is missing),
-- Failed → Degraded (with the reason), Suspended → Suspended. No status yet, or a status for an
-- older generation of the spec → Progressing. Tests: argocd-health-tests/ (run by
-- `cargo test --test ops_content`).
local hs = {}

local function ready_condition(status)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == "Ready" then
      return c
    end
  end
  return nil
end

-- "Reason: message" (just the message if it starts with the reason), or whichever exists.
local function describe(cond, fallback)
  if cond == nil then
    return fallback
  end
  local reason = cond.reason or ""
  local message = cond.message or ""
  if reason ~= "" and message ~= "" then
    if string.sub(message, 1, string.len(reason)) == reason then
      return message
    end
    return reason .. ": " .. message
  end
  if reason ~= "" then
    return reason
  end
  if message ~= "" then
    return message
  end
  return fallback
end

local generation = obj.metadata and obj.metadata.generation
local status = obj.status

if status == nil or (status.phase == nil and status.conditions == nil) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile the connection"
  return hs
end

local cond = ready_condition(status)
local observed = status.observedGeneration
if cond ~= nil and cond.observedGeneration ~= nil and (observed == nil or cond.observedGeneration < observed) then
  observed = cond.observedGeneration
end
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
if phase == "Ready" then
  hs.status = "Healthy"
  hs.message = describe(cond, "Ready")
elseif phase == "Pending" then
  hs.status = "Progressing"
  local fallback = "Pending"
  if status.missingKeys ~= nil and #status.missingKeys > 0 then
    fallback = "Pending: missing keys " .. table.concat(status.missingKeys, ", ")
  end
  hs.message = describe(cond, fallback)
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(cond, "Failed")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(cond, "Suspended: spec.suspend is true")
elseif cond ~= nil and cond.status == "True" then
  -- A phase this script does not know (a newer operator): the Ready condition decides.
  hs.status = "Healthy"
  hs.message = describe(cond, "Ready")
else
  hs.status = "Progressing"
  hs.message = describe(cond, "Waiting for the connection to become Ready")
end
return hs
