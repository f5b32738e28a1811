{{/* Names, labels and the operator's arguments, shared by the templates. */}}

{{- define "vaultconn.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's object name: "<release>-vaultconn", or the release name when it already says vaultconn. */}}
{{- define "vaultconn.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "vaultconn.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vaultconn.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vaultconn.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vaultconn.labels" -}}
helm.sh/chart: {{ include "vaultconn.chart" . }}
{{ include "vaultconn.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "vaultconn.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vaultconn.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: a digest wins over the tag; the tag defaults to the chart's appVersion. */}}
{{- define "vaultconn.image" -}}
{{- $repo := required "image.repository is required" .Values.image.repository }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{- define "vaultconn.leaseName" -}}
{{- default (include "vaultconn.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
The watched namespaces (a list, or a comma-separated string as `--set watchNamespaces=a\,b`
gives), de-duplicated, or an empty list for "all namespaces".
Emitted as JSON so callers get a real list back (fromJsonArray).
*/}}
{{- define "vaultconn.watchNamespaces" -}}
{{- $in := .Values.watchNamespaces | default list }}
{{- if kindIs "string" $in }}
{{- $in = splitList "," $in }}
{{- end }}
{{- $out := list }}
{{- range $in }}
{{- $ns := . | toString | trim }}
{{- if $ns }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $ns) }}
{{- fail (printf "watchNamespaces: %q is not a namespace name" $ns) }}
{{- end }}
{{- $out = append $out $ns }}
{{- end }}
{{- end }}
{{- $out | uniq | toJson }}
{{- end }}

{{/* Checks that turn a broken combination of values into a clear error at render time. */}}
{{- define "vaultconn.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled=true: without a lease every replica would refresh the same OAuth tokens" }}
{{- end }}
{{- if not (has .Values.logFormat (list "json" "text")) }}
{{- fail (printf "logFormat must be json or text, not %q" (toString .Values.logFormat)) }}
{{- end }}
{{- if lt (int .Values.concurrency) 1 }}
{{- fail "concurrency must be at least 1" }}
{{- end }}
{{- end }}

{{/*
The operator's own rules, in a ClusterRole or in a Role per watched namespace.
Only what the operator calls (tests/chart.rs runs the operator as this ServiceAccount):
- vaultconnections: list + watch (the controller's watch; connections are never read one by one
  or written, only their status);
- vaultconnections/status: patch (server-side apply);
- secrets: list + watch (the metadata-only watch), get (credentials and managed Secrets, read
  live), create + update (generated and state Secrets; update is a replace guarded by
  resourceVersion). Never patch or delete: owned Secrets are garbage-collected by owner reference;
- events (events.k8s.io): create, and patch (kube's Recorder patches a repeated event's series).
The CRD is not touched at run time: it comes with the chart.
*/}}
{{- define "vaultconn.operatorRules" -}}
- apiGroups: ["vaultconn.dev"]
  resources: ["vaultconnections"]
  verbs: ["list", "watch"]
- apiGroups: ["vaultconn.dev"]
  resources: ["vaultconnections/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "update"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
