-- Orthanc -> SMILY: ingest a case when one of its slide series has arrived.
--
-- Orthanc calls OnStableSeries once a series has received no new instance
-- for "StableAge" seconds. For a whole-slide series (modality SM) this asks
-- SMILY's HTTP API to ingest the series' case by its accession number:
--   POST <Url>/v1/cases:ingest  {"accessionNumber": "..."}
-- SMILY then finds every slide of the case itself (QIDO-RS) and ingests it
-- again idempotently, so a case whose slides arrive one by one ends up whole.
--
-- Configuration, in Orthanc's configuration file:
--   "LuaScripts": ["/etc/orthanc/smily-ingest.lua"],
--   "Smily": {"Url": "https://smily.example", "Token": "<bearer token of a role allowed to ingest>"}

function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] ~= 'SM' then
    return
  end
  local smily = GetOrthancConfiguration()['Smily']
  if smily == nil or smily['Url'] == nil then
    print('smily-ingest: no "Smily": {"Url": ...} in the configuration; nothing sent')
    return
  end
  local study = ParseJson(RestApiGet('/series/' .. seriesId .. '/study'))
  local accession = study['MainDicomTags']['AccessionNumber']
  if accession == nil or accession == '' then
    print('smily-ingest: slide series ' .. seriesId .. ' has no accession number; not sent')
    return
  end
  local headers = {['Content-Type'] = 'application/json'}
  if smily['Token'] ~= nil then
    headers['Authorization'] = 'Bearer ' .. smily['Token']
  end
  -- The Orthanc id only: the accession number stays out of Orthanc's log.
  HttpPost(smily['Url'] .. '/v1/cases:ingest', DumpJson({accessionNumber = accession}, true), headers)
  print('smily-ingest: case ingest requested for series ' .. seriesId)
end
